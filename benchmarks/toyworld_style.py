"""StyleForge on the toy world: does "zwx style" paint the personal outline-poster style, and only when asked?

    python benchmarks/toyworld_style.py                              # 3 training seeds (outputs/style/train/seed-k)
    python benchmarks/toyworld_style.py --quick                      # one training seed: a smoke run
    python benchmarks/toyworld_style.py --base builtin:toy-flux      # on the FLUX toy model (outputs/style-flux)
    python benchmarks/toyworld_style.py --model outputs/quickstart-styleforge    # one finished result as it is
    python benchmarks/toyworld_style.py --out outputs/style-lr training.learning_rate=5e-4   # a variant of the preset

Trains ``configs/quickstart_styleforge.yaml`` once per training seed (``training.seed``; on ``--base``, with
``toyworld_methods.py``'s overrides for that base; a finished folder is reused). The style statistic is **palette
adherence**: per image, the fraction of pixels whose three channels all lie within 30 of the outline-poster
palette's levels (20, 130, 245) or on its outline colour; the StyleRef images score 1, ordinary world images far
less, and the StyleRef images passed through the toy VAE show the most any generator on it can reach. Read for
the StyleRef images, the base model, the tuned model with "a photo of zwx style, <content>" and the tuned model
with the plain content prompt (style leaking into prompts that do not ask for it), plus the oracle's class read on
each generated image (the content survives). ``--n`` contents (the six content classes in turn), noise seed i for
content i, the same for every model, so differences pair image by image.

Printed and written to ``--out``/style.json (``benchmarks/_results.py``; ``benchmarks/readme_tables.py`` writes the
README's table from it): per row the mean with its 95 % interval over training seeds and images, and each tuned
row's paired difference from the base model; ``--out``/style.png shows training seed 0 (rows: base, styled, plain).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import print_summary, record  # noqa: E402
from toyworld_methods import BASES, train_preset  # noqa: E402  -- the toy bases, one training

LEVELS = np.array([20, 130, 245])
OUTLINE = np.array([15, 10, 30])
CONTENT_CLASSES = ("face", "dog", "cat", "car", "vase", "teddy bear")


def palette_adherence(images: np.ndarray) -> np.ndarray:
    """Per image, the fraction of its pixels drawn from the outline-poster palette (uint8 N x H x W x 3 -> N)."""
    x = images.astype(np.int32)
    on_level = (np.abs(x[..., None] - LEVELS).min(-1) <= 30).all(-1)
    on_outline = (np.abs(x - OUTLINE) <= 30).all(-1)
    return (on_level | on_outline).mean(axis=(1, 2))


def contents(n: int, seed: int = 0):
    from t2i_personal.toyworld import world

    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, cls=CONTENT_CLASSES[i % len(CONTENT_CLASSES)], accessory_rate=0.0) for i in range(n)]
    return scenes, [world.describe(s, full=True)[len("a photo of "):] for s in scenes]


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """decode(encode(x)): no generator can paint the style better than its VAE reproduces it."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((out + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


@torch.no_grad()
def sample(pipe, prompts: list[str]) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    from t2i_personal.families import call_defaults

    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, height=64, width=64,
               output_type="np", **call_defaults(pipe)).images
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="builtin:toy", choices=list(BASES))
    parser.add_argument("--train-seeds", type=int, default=3, help="training seeds (0, 1, ...)")
    parser.add_argument("--quick", action="store_true", help="one training seed and 12 contents")
    parser.add_argument("--model", type=Path, default=None, help="read this finished result only (no training)")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/style[-flux]")
    parser.add_argument("--n", type=int, default=48, help="contents per model (noise seed i for content i)")
    parser.add_argument("overrides", nargs="*", help="config overrides for the training runs, e.g. "
                                                     "training.learning_rate=5e-4")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_seeds, args.n = 1, 12
    if args.model is not None:
        args.train_seeds = 1
    args.out = args.out or ROOT / ("outputs/style" + ("-flux" if args.base != "builtin:toy" else ""))

    from t2i_personal.atomic import write_json_atomic
    from t2i_personal.data.images import load_image_folder
    from t2i_personal.inference.pipeline import load_personalized
    from t2i_personal.methods.styleforge import style_prompt
    from t2i_personal.models.loading import load_components
    from t2i_personal.toyworld.assets import style_dirs
    from t2i_personal.toyworld.oracle import Oracle
    from t2i_personal.toyworld.reports import image_grid

    scenes, texts = contents(args.n)
    oracle = Oracle.from_pretrained()

    def class_read(images):
        return [int(r["cls"] == s.cls) for r, s in zip(oracle.read(images), scenes)]

    refs = np.stack([np.asarray(img) for folder in style_dirs().values() for _, img in load_image_folder(folder)])
    base_components = load_components(args.base)
    base = sample(base_components.pipeline(), [f"a photo of {t}" for t in texts])
    fixed = {"StyleRef images": {"palette": palette_adherence(refs).tolist()},
             "StyleRef through the VAE (ceiling)": {
                 "palette": palette_adherence(reconstruct(base_components.vae, refs)).tolist()},
             "base model": {"palette": palette_adherence(base).tolist(), "class": class_read(base)}}
    outcomes = {row: [] for row in [*fixed, "tuned, style prompt", "tuned, plain prompt"]}
    started = time.perf_counter()
    for seed in range(args.train_seeds):
        model = args.model or train_preset("configs/quickstart_styleforge.yaml", args.out / "train" / f"seed-{seed}",
                                                     args.base, seed, args.overrides)
        token = json.loads((model / "personalization.json").read_text())["concepts"][0]["identifier"]
        tuned = load_personalized(model)
        styled = sample(tuned, [style_prompt(t, token) for t in texts])
        plain = sample(tuned, [f"a photo of {t}" for t in texts])
        for row, reading in fixed.items():  # the same for every training seed: recorded per seed so rows pair
            outcomes[row].append(reading)
        outcomes["tuned, style prompt"].append({"palette": palette_adherence(styled).tolist(),
                                                "class": class_read(styled)})
        outcomes["tuned, plain prompt"].append({"palette": palette_adherence(plain).tolist(),
                                                "class": class_read(plain)})
        print(f"training seed {seed}: palette styled {np.mean(outcomes['tuned, style prompt'][-1]['palette']):.3f}, "
              f"plain {np.mean(outcomes['tuned, plain prompt'][-1]['palette']):.3f}", flush=True)
        if seed == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            image_grid(np.concatenate([base[:12], styled[:12], plain[:12]]), columns=12, scale=2).save(
                args.out / "style.png")
    result = record(benchmark="style", base=args.base, script="benchmarks/toyworld_style.py", argv=argv,
                    outcomes=outcomes, baseline="base model", train_seeds=args.train_seeds, images_per_cell=args.n,
                    seconds=time.perf_counter() - started, model=str(args.model) if args.model else None,
                    overrides=args.overrides)
    print_summary(result, ["palette", "class"])
    write_json_atomic(args.out / "style.json", result)
    print(f"wrote {args.out / 'style.json'} and {args.out / 'style.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
