"""FreeCure on the toy world: does it give the personal face the hair the prompt asks for, and keep the face?

    accelerate launch train/train.py --config configs/quickstart_face.yaml      # once, ~3 minutes on 2 cores
    python benchmarks/toyworld_freecure.py [--model outputs/quickstart-face] [--seeds 8] [--out outputs/freecure]

For each hair colour of the toy world and each seed, "a photo of sks person with short <colour> hair" is generated
three ways from the same seed: the plain personalized model, its foundation (LoRA off, "a photo of person with
..."), and FreeCure (face-parsing hair mask, FASA, APG off). Each image is read twice:

- hair: the toy face parser's hair region in *that* image, its median colour, the nearest of the world's hair
  colours plus the subject's own purple: "as asked" when it is the prompt's colour;
- subject: the toy oracle recognises the personal face (fidelity; the subject's hair is part of its identity, so
  a perfect repair can lower this).

Prints both rates for the three and writes ``--out``/panels.png (foundation | mask | personalized | FreeCure rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJECT_HAIR = (135, 60, 200)  # the personal face's purple bob (world._draw_face)


def hair_colour(parser, image) -> str:
    """The nearest named hair colour to the median of the parser's hair pixels, or "none" without hair pixels."""
    from t2i_personal.toyworld import world

    labels = parser.parse([image])[0]
    hair = labels == parser.label_ids("hair")[0]
    if hair.sum() < 4:
        return "none"
    rgb = np.median(np.asarray(image.convert("RGB"), np.float64)[hair], axis=0)
    palette = {**world.HAIR_COLOURS, "purple (subject)": SUBJECT_HAIR}
    return min(palette, key=lambda k: float(np.sum((np.array(palette[k]) - rgb) ** 2)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="outputs/quickstart-face")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--omega", type=float, default=None, help="FASA weight (default: 0.5, the SD-1.x default)")
    p.add_argument("--out", default="outputs/freecure")
    args = p.parse_args(argv)

    from t2i_personal import load_personalized
    from t2i_personal.data.images import make_image_grid, save_image_atomic
    from t2i_personal.freecure import FreeCure
    from t2i_personal.freecure.masks import TOY_FACE_PARSER, load_face_parser
    from t2i_personal.toyworld import world
    from t2i_personal.toyworld.oracle import Oracle

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_personalized(args.model)
    pipe.set_progress_bar_config(disable=True)
    cure = FreeCure(pipe, attributes=["hair"], mask_source="face_parsing", apg=False, omega=args.omega)
    parser = load_face_parser(TOY_FACE_PARSER)
    oracle = Oracle.from_pretrained()
    identifier, class_noun = cure.concepts[0]
    counts = {k: {"hair": 0, "subject": 0} for k in ("personalized", "foundation", "FreeCure")}
    panels, n, start = [], 0, time.perf_counter()
    for colour in world.HAIR_COLOURS:
        prompt = f"a photo of {identifier} {class_noun} with short {colour} hair"
        for seed in range(args.seeds):
            out = cure(prompt, seed=seed, num_inference_steps=args.steps, guidance_scale=args.guidance, compare=True)
            images = {"personalized": out.personalized_images[0], "foundation": out.foundation_images[0],
                      "FreeCure": out.images[0]}
            readings = dict(zip(images, oracle.read(list(images.values()))))
            for k, image in images.items():
                counts[k]["hair"] += hair_colour(parser, image) == colour
                counts[k]["subject"] += readings[k]["subject"] == "face"
            n += 1
            if seed < 2:
                panels.append(out.panel())
    elapsed = time.perf_counter() - start
    print(f"{n} prompts x seeds ({len(world.HAIR_COLOURS)} hair colours x {args.seeds} seeds), {args.steps} steps, "
          f"CFG {args.guidance}, omega {cure.omega}, {elapsed:.0f} s")
    print(f"{'':14s} {'hair as asked':>14s} {'subject kept':>13s}")
    for k, c in counts.items():
        print(f"{k:14s} {c['hair'] / n:14.3f} {c['subject'] / n:13.3f}")
    out_dir = Path(args.out)
    save_image_atomic(make_image_grid(panels, rows=len(panels)), out_dir / "panels.png")
    (out_dir / "summary.json").write_text(json.dumps({
        "model": str(Path(args.model).resolve()), "n": n, "steps": args.steps, "guidance": args.guidance,
        "omega": cure.omega, "rates": {k: {m: v / n for m, v in c.items()} for k, c in counts.items()}}, indent=2))
    print(f"wrote {out_dir / 'panels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
