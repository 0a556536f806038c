"""Real-photo features on the toy world: a subject folder of mixed aspect ratios with cluttered backgrounds, trained
as a square center crop, with aspect-ratio buckets, with the masked loss, and with both (CPU, no downloads).

    python benchmarks/toyworld_real_photos.py [--out outputs/real-photos] [--train-seeds 3] [--runs square ...]

The folder is made by the world: six views of the personal teal dog, each pasted over a scene of another object
with a second object beside it, on portrait (64x96), landscape (96x64) and square (80x80) canvases; every photo
gets its exact subject mask (``dog.mask.png``) from the render. The ``auto-masks`` run trains on a copy of the folder
whose masks ``python -m t2i_personal.mask --class-noun dog --model builtin:toy-segmenter`` wrote instead (their IoU
with the exact masks is printed). Each run is the quickstart recipe (``configs/quickstart.yaml``) at ``--steps``
(400, as the methods compare) on that folder; the evaluation is ``toyworld_methods.py``'s: subject (the oracle sees
the personal dog in "a photo of sks dog <where>"), scene (the scene asked for) and drift (the plain class prompt
shows the personal dog), over 8 scenes x ``--images-per-scene`` noise seeds, for each training seed. Printed and
written to ``--out``/real_photos.json (``benchmarks/_results.py``; ``benchmarks/readme_tables.py`` writes the
README's table from it): per run the mean with its 95 % interval over training seeds and images, and its paired
difference from the square center crop.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import print_summary, record  # noqa: E402
from toyworld_methods import (IMAGES_PER_SCENE, METRICS, evaluate_or_reuse,  # noqa: E402  -- the methods'
                              train_preset)  # readings and training

RUNS = {
    "square": [],
    "buckets": ["data.buckets=true"],
    "masks": ["data.masks=files"],
    "buckets+masks": ["data.buckets=true", "data.masks=files"],
    "auto-masks": ["data.masks=files"],  # on a copy whose masks come from builtin:toy-segmenter, not the render
}
CANVASES = [(64, 96), (96, 64), (80, 80)]  # (width, height)


def cluttered_photos(folder: Path, count: int = 6, seed: int = 0) -> Path:
    """``count`` photos of the personal dog on cluttered, non-square canvases, each with its exact mask."""
    from t2i_personal.toyworld import world

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        width, height = CANVASES[i % len(CANVASES)]
        subject = world.subject_scene("dog", rng)
        backdrop = world.render(world.sample_scene(rng, cls=rng.choice(["car", "vase", "cat"]), scene=subject.scene))
        canvas = np.asarray(Image.fromarray(backdrop.image).resize((width, height), Image.Resampling.BILINEAR)).copy()
        clutter = world.render(world.sample_scene(rng, cls=rng.choice(["car", "vase", "teddy bear"])))
        cx, cy = rng.randint(0, width - 64), rng.randint(0, height - 64)
        region = canvas[cy:cy + 64, cx:cx + 64]
        region[clutter.masks["body"]] = clutter.image[clutter.masks["body"]]
        dog = world.render(subject)
        x, y = rng.randint(0, width - 64), rng.randint(0, height - 64)
        region = canvas[y:y + 64, x:x + 64]
        region[dog.masks["body"]] = dog.image[dog.masks["body"]]
        mask = np.zeros((height, width), np.uint8)
        mask[y:y + 64, x:x + 64][dog.masks["body"]] = 255
        Image.fromarray(canvas).save(folder / f"dog{i}.png")
        Image.fromarray(mask, mode="L").save(folder / f"dog{i}.mask.png")
    return folder


def auto_masked_copy(photos: Path, folder: Path) -> tuple[Path, list[float]]:
    """``photos`` without their masks, masked by the toy segmenter through the mask command; and each photo's IoU
    of its automatic mask with the exact one."""
    import shutil

    from t2i_personal import mask

    folder.mkdir(parents=True, exist_ok=True)
    exact = sorted(p for p in photos.glob("*.png") if not p.name.endswith(".mask.png"))
    for path in exact:
        shutil.copyfile(path, folder / path.name)
    mask.mask_folder(folder, "dog", mask.load_masker(mask.TOY_SEGMENTER), overwrite=True)
    ious = []
    for path in exact:
        truth = np.asarray(Image.open(path.with_name(path.stem + ".mask.png"))) > 127
        auto = np.asarray(Image.open(folder / f"{path.stem}.mask.png")) > 127
        ious.append(float((truth & auto).sum() / max(1, (truth | auto).sum())))
    return folder, ious


def photo_sheet(folder: Path) -> Image.Image:
    """Each photo beside its mask (the README's picture of the folder)."""
    from t2i_personal.data.images import make_image_grid

    tiles = []
    for path in sorted(p for p in folder.glob("*.png") if not p.name.endswith(".mask.png")):
        tiles += [Image.open(path).convert("RGB"), Image.open(path.with_name(path.stem + ".mask.png")).convert("RGB")]
    return make_image_grid(tiles, columns=4)


def train_or_reuse(name: str, photos: Path, out_root: Path, steps: int, seed: int) -> Path:
    return train_preset("configs/quickstart.yaml", out_root / f"{name}-seed{seed}", "builtin:toy", seed,
                        RUNS[name] + [f"concepts.0.instance_dir={photos}", f"training.max_train_steps={steps}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/real-photos"))
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run (as the methods compare)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                        help="the first is the baseline of the paired differences")
    parser.add_argument("--train-seeds", type=int, default=3, help="training seeds per run (0, 1, ...)")
    parser.add_argument("--images-per-scene", type=int, default=IMAGES_PER_SCENE)
    args = parser.parse_args(argv)
    from t2i_personal.atomic import write_json_atomic
    from t2i_personal.toyworld.reports import image_grid

    photos = cluttered_photos(args.out / "photos")
    photo_sheet(photos).save(args.out / "photos.png")
    outcomes, seconds, mask_ious = {}, {}, None
    if "auto-masks" in args.runs:
        auto_photos, mask_ious = auto_masked_copy(photos, args.out / "photos-auto-masks")
        photo_sheet(auto_photos).save(args.out / "photos-auto-masks.png")
        print(f"automatic masks: IoU with the exact masks {np.mean(mask_ious):.3f} "
              f"({', '.join(f'{v:.2f}' for v in mask_ious)})", flush=True)
    for name in args.runs:
        started, outcomes[name] = time.perf_counter(), []
        for seed in range(args.train_seeds):
            folder = args.out / "photos-auto-masks" if name == "auto-masks" else photos
            metrics, images = evaluate_or_reuse(train_or_reuse(name, folder, args.out, args.steps, seed),
                                                args.images_per_scene)
            outcomes[name].append(metrics["outcomes"])
            image_grid(images, columns=args.images_per_scene * 4, scale=2).save(args.out / f"{name}-seed{seed}.png")
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {metrics[k]:.2f}" for k in METRICS), flush=True)
        seconds[name] = time.perf_counter() - started
    result = record(benchmark="real_photos", base="builtin:toy", script="benchmarks/toyworld_real_photos.py",
                    argv=argv, outcomes=outcomes, baseline=args.runs[0], train_seeds=args.train_seeds,
                    images_per_cell=len(outcomes[args.runs[0]][0]["subject"]), steps=args.steps,
                    auto_mask_iou=mask_ious, seconds=seconds)
    print_summary(result, list(METRICS))
    write_json_atomic(args.out / "real_photos.json", result)
    print(f"wrote {args.out / 'real_photos.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
