"""FreeCure on the toy world: does it give the personal face the hair the prompt asks for, and keep the face?

    accelerate launch train/train.py --config configs/quickstart_face.yaml      # once, ~3 minutes on 2 cores
    python benchmarks/toyworld_freecure.py [--model outputs/quickstart-face] [--seeds 8] [--out outputs/freecure]
    python benchmarks/toyworld_freecure.py --base builtin:toy-flux  # trains quickstart_face on the FLUX toy model
                                                                    # first (outputs/quickstart-face-flux)

For each hair colour of the toy world and each seed, "a photo of sks person with short <colour> hair" is generated
three ways from the same seed: the plain personalized model, its foundation (LoRA off, "a photo of person with
..."), and FreeCure (face-parsing hair mask, FASA, APG off). Each image is read twice:

- hair: the toy face parser's hair region in *that* image, its median colour, the nearest of the world's hair
  colours plus the subject's own purple: "as asked" when it is the prompt's colour;
- change: the mean absolute pixel difference (0-255) between FreeCure and the plain personalized image, inside and
  outside the attribute mask (FreeCure should change the attribute and leave the rest).

No identity score: the toy oracle recognises the personal face in none of the plain personalized images, and the
shirt colour (the subject's teal) is read as teal in only 1 of 20 of them, so neither can tell a kept identity from a
lost one at this model's quality.

``--omega 0.5 1 2`` adds one FreeCure row per FASA weight (``--layers`` picks the FASA layers). Prints the rates and
writes ``--out``/panels.png (foundation | mask | personalized | FreeCure at each ω) and ``--out``/summary.json.
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
from toyworld_methods import BASES  # noqa: E402  -- what each toy base changes in a preset

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="builtin:toy", choices=list(BASES))
    p.add_argument("--model", default=None, help="a trained result (default: outputs/quickstart-face[-flux], "
                                                 "trained first with --base when missing)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--omega", type=float, nargs="+", default=[None],
                   help="FASA weights, one FreeCure row each (default: the family's, SD-1.x 0.5, FLUX 1.0)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="FASA layers: module names or patterns (default: the family's)")
    p.add_argument("--fasa-start", type=float, default=None,
                   help="fraction of the steps before FASA acts (default: the family's, FLUX 0.25)")
    p.add_argument("--out", default=None, help="default: outputs/freecure[-flux]")
    args = p.parse_args(argv)
    suffix = "-flux" if args.base != "builtin:toy" else ""
    args.out = args.out or f"outputs/freecure{suffix}"
    if args.model is None:
        args.model = f"outputs/quickstart-face{suffix}"
        if not (Path(args.model) / "personalization.json").exists():
            from t2i_personal.config import load_config
            from t2i_personal.training.trainer import train

            train(load_config(ROOT / "configs" / "quickstart_face.yaml", BASES[args.base] + [
                f"training.output_dir={args.model}", "training.report_to=none"]))

    from t2i_personal import load_personalized
    from t2i_personal.data.images import make_image_grid, save_image_atomic
    from t2i_personal.atomic import write_json_atomic
    from t2i_personal.freecure import FreeCure
    from t2i_personal.freecure.masks import TOY_FACE_PARSER, load_face_parser
    from t2i_personal.toyworld import world

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_personalized(args.model)
    pipe.set_progress_bar_config(disable=True)
    cures = [FreeCure(pipe, attributes=["hair"], mask_source="face_parsing", apg=False, omega=omega,
                      layers=args.layers, fasa_start=args.fasa_start) for omega in args.omega]
    rows = ["personalized", "foundation"] + [f"FreeCure, omega {c.omega:g}" for c in cures]
    parser = load_face_parser(TOY_FACE_PARSER)
    hair_palette = {**world.HAIR_COLOURS, "purple (subject)": SUBJECT_HAIR}
    identifier, class_noun = cures[0].concepts[0]
    as_asked = {row: 0 for row in rows}
    change = {row: {"inside": [], "outside": []} for row in rows[2:]}
    panels, n, start = [], 0, time.perf_counter()
    for colour in world.HAIR_COLOURS:
        prompt = f"a photo of {identifier} {class_noun} with short {colour} hair"
        for seed in range(args.seeds):
            # the toy size, explicitly: FluxPipeline's default is 512 px whatever the model was trained at
            outs = [cure(prompt, seed=seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                         compare=i == 0, height=64, width=64) for i, cure in enumerate(cures)]
            personalized = outs[0].personalized_images[0]
            images = [personalized, outs[0].foundation_images[0]] + [o.images[0] for o in outs]
            for row, image in zip(rows, images):
                as_asked[row] += part_colour(parser, image, "hair", hair_palette) == colour
            for row, out in zip(rows[2:], outs):
                diff = np.abs(np.asarray(out.images[0], np.float64) - np.asarray(personalized, np.float64))
                inside = np.asarray(out.mask[0]) > 127
                if inside.any():
                    change[row]["inside"].append(diff[inside].mean())
                change[row]["outside"].append(diff[~inside].mean())
            n += 1
            if seed < 2:
                panels.append(side_by_side([outs[0].panel()] + [last_tile(o.panel()) for o in outs[1:]]))
    elapsed = time.perf_counter() - start
    print(f"{n} prompts x seeds ({len(world.HAIR_COLOURS)} hair colours x {args.seeds} seeds), {args.steps} steps, "
          f"guidance {args.guidance}, FASA layers {', '.join(cures[0].layers)} from step "
          f"{int(cures[0].fasa_start * args.steps)}, {elapsed:.0f} s")
    print(f"{'':20s} {'hair as asked':>14s} {'change inside / outside the mask (0-255)':>42s}")
    summary = {}
    for row in rows:
        inside = float(np.mean(change[row]["inside"] or [0.0])) if row in change else None
        outside = float(np.mean(change[row]["outside"])) if row in change else None
        moved = f"{inside:.1f} / {outside:.1f}" if row in change else "-"
        print(f"{row:20s} {as_asked[row] / n:14.3f} {moved:>42s}")
        summary[row] = {"hair_as_asked": as_asked[row] / n, "change_inside_mask": inside,
                        "change_outside_mask": outside}
    out_dir = Path(args.out)
    save_image_atomic(make_image_grid(panels, rows=len(panels)), out_dir / "panels.png")
    write_json_atomic(out_dir / "summary.json", {
        "model": str(Path(args.model).resolve()), "base": args.base, "n": n, "steps": args.steps,
        "guidance": args.guidance, "omegas": [c.omega for c in cures], "layers": list(cures[0].layers),
        "fasa_start": cures[0].fasa_start,
        "rows": summary})
    print(f"wrote {out_dir / 'panels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
