"""FreeCure on the toy world: does it give the personal face the hair the prompt asks for, and keep the rest?

    python benchmarks/toyworld_freecure.py                      # 3 training seeds of configs/quickstart_face.yaml
    python benchmarks/toyworld_freecure.py --base builtin:toy-flux --omega 0.5 1 2     # on the FLUX toy model
    python benchmarks/toyworld_freecure.py --model outputs/quickstart-face            # one finished result
    python benchmarks/toyworld_freecure.py --quick                                    # one training seed

Trains ``configs/quickstart_face.yaml`` once per training seed (``training.seed``; on ``--base`` with
``toyworld_methods.py``'s overrides for that base; ``--out``/train/seed-k, a finished folder is reused). For each
hair colour of the toy world and each of ``--seeds`` noise seeds, "a photo of sks person with short <colour> hair"
is generated from the same noise by the plain personalized model, its foundation (LoRA off, "a photo of person
with ..."), and FreeCure at each ``--omega`` (face-parsing hair mask, FASA, APG off). Each image is read:

- hair: the toy face parser's hair region in *that* image, its median colour, the nearest of the world's hair
  colours plus the subject's own purple: 1 when it is the prompt's colour ("as asked");
- change (FreeCure rows): the mean absolute pixel difference (0-255) between FreeCure and the plain personalized
  image inside the attribute mask (0 when the mask is empty) and outside it (FreeCure should change the attribute
  and leave the rest).

No identity score: the toy oracle recognised the personal face in none of the plain personalized images on the
earlier toy generator, so it could not tell a kept identity from a lost one at this model's quality.

Printed and written to ``--out``/freecure.json (``benchmarks/_results.py``; ``benchmarks/readme_tables.py`` writes
the README's table from it): per row the mean with its 95 % interval over training seeds and images, and each
row's paired difference from the personalized image. ``--out``/panels.png shows training seed 0 (foundation |
mask | personalized | FreeCure at each ω, two noise seeds per colour). ``--layers`` and ``--fasa-start`` override
the family's FASA layers and start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import print_summary, record  # noqa: E402
from toyworld_methods import BASES, train_preset  # noqa: E402  -- the toy bases, one training

SUBJECT_HAIR = (135, 60, 200)  # the personal face's purple bob (_draw_face in t2i_personal/toyworld/drawing.py)


def part_colour(parser, image, label: str, palette: dict) -> str:
    """The palette name nearest to the median colour of the parser's ``label`` region, or "none" if it is absent."""
    labels = parser.parse([image])[0]
    region = labels == parser.model.config.label2id[label]
    if region.sum() < 4:
        return "none"
    rgb = np.median(np.asarray(image.convert("RGB"), np.float64)[region], axis=0)
    return min(palette, key=lambda k: float(np.sum((np.array(palette[k]) - rgb) ** 2)))


def last_tile(panel):
    """The rightmost tile of a FreeCure panel (its FreeCure image with its label): tiles are square below the label."""
    side = panel.height - 14
    return panel.crop((panel.width - side, 0, panel.width, panel.height))


def side_by_side(images):
    from PIL import Image

    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    return canvas


def read_one_model(model: Path, args, parser, panels: list | None) -> tuple[dict[str, dict[str, list]], list]:
    """Every image's outcomes for one tuned model (row -> figure -> one value per colour and noise seed), and the
    FreeCure instances that made them."""
    from t2i_personal import load_personalized
    from t2i_personal.freecure import FreeCure
    from t2i_personal.toyworld import world

    pipe = load_personalized(model)
    pipe.set_progress_bar_config(disable=True)
    cures = [FreeCure(pipe, attributes=["hair"], mask_source="face_parsing", apg=False, omega=omega,
                      layers=args.layers, fasa_start=args.fasa_start) for omega in args.omega]
    rows = ["personalized", "foundation"] + [f"FreeCure, omega {c.omega:g}" for c in cures]
    hair_palette = {**world.HAIR_COLOURS, "purple (subject)": SUBJECT_HAIR}
    identifier, class_noun = cures[0].concepts[0]
    outcomes = {row: {"hair": []} for row in rows}
    for row in rows[2:]:
        outcomes[row].update(change_inside=[], change_outside=[])
    for colour in world.HAIR_COLOURS:
        prompt = f"a photo of {identifier} {class_noun} with short {colour} hair"
        for seed in range(args.seeds):
            # the toy size, explicitly: FluxPipeline's default is 512 px whatever the model was trained at
            outs = [cure(prompt, seed=seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                         compare=i == 0, height=64, width=64) for i, cure in enumerate(cures)]
            personalized = outs[0].personalized_images[0]
            images = [personalized, outs[0].foundation_images[0]] + [o.images[0] for o in outs]
            for row, image in zip(rows, images):
                outcomes[row]["hair"].append(int(part_colour(parser, image, "hair", hair_palette) == colour))
            for row, out in zip(rows[2:], outs):
                diff = np.abs(np.asarray(out.images[0], np.float64) - np.asarray(personalized, np.float64))
                inside = np.asarray(out.mask[0]) > 127
                outcomes[row]["change_inside"].append(float(diff[inside].mean()) if inside.any() else 0.0)
                outcomes[row]["change_outside"].append(float(diff[~inside].mean()))
            if panels is not None and seed < 2:
                panels.append(side_by_side([outs[0].panel()] + [last_tile(o.panel()) for o in outs[1:]]))
    return outcomes, cures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="builtin:toy", choices=list(BASES))
    p.add_argument("--model", type=Path, default=None, help="read this finished result only (no training)")
    p.add_argument("--train-seeds", type=int, default=3, help="training seeds (0, 1, ...)")
    p.add_argument("--quick", action="store_true", help="one training seed and 2 noise seeds per colour")
    p.add_argument("--seeds", type=int, default=8, help="noise seeds per hair colour")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--omega", type=float, nargs="+", default=[None],
                   help="FASA weights, one FreeCure row each (default: the family's, SD-1.x 0.5, FLUX 1.0)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="FASA layers: module names or patterns (default: the family's)")
    p.add_argument("--fasa-start", type=float, default=None,
                   help="fraction of the steps before FASA acts (default: the family's, FLUX 0.25)")
    p.add_argument("--out", type=Path, default=None, help="default: outputs/freecure[-flux]")
    p.add_argument("overrides", nargs="*", help="config overrides for the training runs")
    args = p.parse_args(argv)
    if args.quick:
        args.train_seeds, args.seeds = 1, 2
    if args.model is not None:
        args.train_seeds = 1
    args.out = args.out or ROOT / ("outputs/freecure" + ("-flux" if args.base != "builtin:toy" else ""))

    from t2i_personal.atomic import write_json_atomic
    from t2i_personal.data.images import make_image_grid, save_image_atomic
    from t2i_personal.freecure.masks import TOY_FACE_PARSER, load_face_parser

    torch.set_num_threads(max(1, torch.get_num_threads()))
    parser = load_face_parser(TOY_FACE_PARSER)
    outcomes, panels, start = {}, [], time.perf_counter()
    for seed in range(args.train_seeds):
        model = args.model or train_preset("configs/quickstart_face.yaml", args.out / "train" / f"seed-{seed}",
                                                     args.base, seed, args.overrides)
        per_row, cures = read_one_model(model, args, parser, panels if seed == 0 else None)
        for row, figures in per_row.items():
            outcomes.setdefault(row, []).append(figures)
        print(f"training seed {seed}: hair as asked " + ", ".join(
            f"{row} {np.mean(figures['hair']):.3f}" for row, figures in per_row.items()), flush=True)
    n = len(outcomes["personalized"][0]["hair"])
    print(f"{n} prompts x noise seeds per model, {args.steps} steps, guidance {args.guidance}, FASA layers "
          f"{', '.join(cures[0].layers)} from step {int(cures[0].fasa_start * args.steps)}, {time.perf_counter() - start:.0f} s")
    result = record(benchmark="freecure", base=args.base, script="benchmarks/toyworld_freecure.py", argv=argv,
                    outcomes=outcomes, baseline="personalized", train_seeds=args.train_seeds, images_per_cell=n,
                    seconds=time.perf_counter() - start, model=str(args.model) if args.model else None,
                    steps=args.steps, guidance=args.guidance, omegas=[c.omega for c in cures],
                    layers=list(cures[0].layers), fasa_start=cures[0].fasa_start, overrides=args.overrides)
    print_summary(result, ["hair", "change_inside", "change_outside"])
    save_image_atomic(make_image_grid(panels, rows=len(panels)), args.out / "panels.png")
    write_json_atomic(args.out / "freecure.json", result)
    print(f"wrote {args.out / 'freecure.json'} and {args.out / 'panels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
