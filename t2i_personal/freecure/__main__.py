"""Generate with FreeCure attribute repair from a trained result.

    python -m t2i_personal.freecure --model outputs/my-dog --prompt "a sks dog wearing a red hat" --seed 0
    python -m t2i_personal.freecure --model outputs/me --prompt "a sks man with curly red hair and glasses" \
        --attributes hair,glasses --mask-source face_parsing --compare

Writes OUT/repaired.png, foundation.png, mask.png (union), masks/<attribute>.png, panel.png (foundation | mask |
[personalized] | [before APG] | repaired), with --compare personalized.png, and freecure.json (prompts, attributes,
mask sources, settings).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import FreeCureOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_personal.freecure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="OUT_DIR", help="a training output_dir or checkpoint folder")
    p.add_argument("--prompt", required=True, help="the prompt, with the concept's identifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's, 7.5 for SD-1.x/2.x, 5 for SDXL)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--attributes", default="auto",
                   help="comma-separated attributes to repair (e.g. hair,glasses), or auto (default): the face parts "
                        "and accessories the prompt names")
    p.add_argument("--mask-source", default="auto",
                   help="auto (default: face parsing for a person's face parts, cross-attention otherwise), "
                        "face_parsing, cross_attention, or a mask image file (white = attribute)")
    p.add_argument("--face-parser", default="auto",
                   help="face-parsing model: hub id or folder (default jonathandinu/face-parsing; the toy world's "
                        "own parser for builtin:toy results)")
    p.add_argument("--omega", type=float, default=None,
                   help="FASA weight (default 0.5 for SD-1.x, 1.5 for SDXL, 1.0 for FLUX and SD3)")
    p.add_argument("--fasa-start", type=float, default=None,
                   help="fraction of the sampling steps before FASA acts (default 0; 0.25 for FLUX)")
    p.add_argument("--layers", default=None,
                   help="comma-separated attn1 module names or globs (default: the released code's layers)")
    p.add_argument("--no-apg", action="store_true", help="never run APG (expression restoration)")
    p.add_argument("--apg-gamma", type=float, default=0.5, help="APG inversion depth as a fraction of T (default 0.5)")
    p.add_argument("--foundation", default=None,
                   help="the foundation model (default: the result's own base, or its adapters switched off)")
    p.add_argument("--compare", action="store_true", help="also render the plain personalized image (one pass more)")
    p.add_argument("--cache-device", default=None,
                   help="where the foundation's keys/values wait between the passes, e.g. cpu to spare GPU memory "
                        "(default: beside the model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--allow-pickle", action="store_true", help="allow a face parser stored only as a pickle .bin")
    p.add_argument("--out", default="freecure_out", help="output folder (default freecure_out/)")
    return p


def options_from_args(args) -> FreeCureOptions:
    from .options import FreeCureOptions

    return FreeCureOptions(attributes=args.attributes, mask_source=args.mask_source, omega=args.omega,
                           fasa_start=args.fasa_start, layers=args.layers.split(",") if args.layers else None, apg=not args.no_apg,
                           apg_gamma=args.apg_gamma, face_parser=args.face_parser, foundation=args.foundation,
                           cache_device=args.cache_device, allow_pickle=args.allow_pickle)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..atomic import write_json_atomic
    from ..data.images import ImageLoadError, save_image_atomic
    from ..errors import UserError
    from ..inference.pipeline import load_personalized
    from . import FreeCure
    from .pipeline import check_prompts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps < 1:
        print(f"error: --steps must be at least 1, not {args.steps}", file=sys.stderr)
        return 2
    try:
        # before the model loads (minutes, for a large one); the identifiers once FreeCure knows the concepts
        options = options_from_args(args).check()
        check_prompts([args.prompt], concepts=[])
        pipe = load_personalized(args.model, device=device, dtype=getattr(torch, args.dtype), allow_pickle=args.allow_pickle)
        cure = FreeCure(pipe, options)
        result = cure(args.prompt, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                      compare=args.compare)
    except (UserError, ImageLoadError, FileNotFoundError, ValueError) as exc:
        # ValueError: what the diffusers pipeline says of bad sizes or options (e.g. "divisible by 8")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    save_image_atomic(result.images[0], out / "repaired.png")
    if result.foundation_images:
        save_image_atomic(result.foundation_images[0], out / "foundation.png")
    save_image_atomic(result.mask[0], out / "mask.png")
    for attribute, image in result.masks[0].items():
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", attribute).strip("_") or "mask"  # never a path from user text
        save_image_atomic(image, out / "masks" / f"{name}.png")
    if result.personalized_images is not None:
        save_image_atomic(result.personalized_images[0], out / "personalized.png")
    if result.before_apg is not None:
        save_image_atomic(result.before_apg[0], out / "before_apg.png")
    save_image_atomic(result.panel(), out / "panel.png")
    write_json_atomic(out / "freecure.json", {
        "model": str(Path(args.model).resolve()), "prompt": result.prompts[0],
        "foundation_prompt": result.foundation_prompts[0], "seed": args.seed, "attributes": result.attributes,
        "mask_sources": result.mask_sources, "apg_applied": result.apg_applied, **result.settings})
    sources = ", ".join(f"{a} ({s})" for a, s in result.mask_sources.items()) or "none (nothing to repair)"
    print(f"foundation prompt: {result.foundation_prompts[0]!r}; attributes: {sources}; "
          f"APG: {'yes' if result.apg_applied else 'no'}")
    print(f"wrote {out / 'repaired.png'} and {out / 'panel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
