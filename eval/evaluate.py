"""Generate images of trained results over a prompt set, score them, and write results.csv, summary.json, report.html.

    python eval/evaluate.py --model outputs/my-dog [--model outputs/other] --prompts dreambench-live \
        --images-per-prompt 4 --seed 0 [--metrics clip_t,clip_i,ti_clip,dino_i] [--out eval_out/]
    accelerate launch eval/evaluate.py ...        # generation split across processes, rank 0 scores
    python eval/evaluate.py --images eval_out/my-dog --concept sks:dog --references data/my-dog --prompts ...
    python eval/evaluate.py --model outputs/dog-and-cat --metrics clip_t,cp_clip      # Gen4Gen CP-CLIP (OWL-ViT)
    python eval/evaluate.py --model outputs/my-style --fid-reference data/style-art --fid-feature builtin:toy-clip
    python eval/evaluate.py --model outputs/me --prompts prompts.yaml --freecure    # with and without FreeCure

Images go to OUT/<model>/<prompt-index>-<slug>/<k>.png (image k of prompt p uses seed SEED + p * N + k); files
that exist are kept, so rerunning an interrupted evaluation only renders what is missing. See eval/README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t2i_personal.data.images import ImageLoadError
from t2i_personal.errors import UserError
from t2i_personal.evaluation import METRICS, EvalConfig, GenerationOptions, MetricOptions, evaluate
from t2i_personal.freecure import FreeCureOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", action="append", default=[], metavar="OUT_DIR",
                     help="a training output_dir (or checkpoints/checkpoint-*/); repeat to compare models")
    src.add_argument("--images", action="append", default=[], metavar="DIR",
                     help="score existing images laid out as DIR/<prompt-index>-<slug>/*.png (what this script "
                          "writes under OUT/<model>/) without generating; repeatable")
    src.add_argument("--concept", action="append", default=[], metavar="ID:CLASS",
                     help="--images mode: a concept the prompts are rendered for, e.g. sks:dog (repeatable); "
                          "taken from the first --model's record when omitted")
    src.add_argument("--references", action="append", default=[], metavar="DIR",
                     help="reference images per concept (repeat in concept order) for clip_i/dino_i/cp_clip; default: "
                          "the concepts' instance_dir from each model's personalization.json")
    src.add_argument("--prompts", default="dreambench",
                     help="built-in set (dreambench, dreambench-live, dreambench-objects) or a .txt/.yaml file")
    src.add_argument("--images-per-prompt", type=int, default=4)
    src.add_argument("--seed", type=int, default=0)
    src.add_argument("--out", default="eval_out", help="output folder (default eval_out/)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=None,
                     help="CFG scale (FLUX.1-dev: its embedded guidance); default: the guidance a result trained with, "
                          "else its family's (SD/SDXL 7.5, SD3 7.0, FLUX 3.5)")
    gen.add_argument("--height", type=int, default=None, help="default: the model's training resolution")
    gen.add_argument("--width", type=int, default=None, help="default: the model's training resolution")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--device", default=None, help="default: accelerate's device (cuda if available, else cpu)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    fc = p.add_argument_group("FreeCure (attribute repair), scored side by side with the plain model")
    fc.add_argument("--freecure", action="store_true",
                    help="also generate every --model with FreeCure, as '<model>+freecure'")
    fc.add_argument("--freecure-attributes", default=None,
                    help="comma-separated attributes to repair (default auto: those the prompt names)")
    fc.add_argument("--freecure-mask-source", default=None,
                    help="auto (default), face_parsing, cross_attention, or a mask image")
    fc.add_argument("--freecure-omega", type=float, default=None, help="FASA weight (default per family)")
    fc.add_argument("--freecure-fasa-start", type=float, default=None,
                    help="fraction of the sampling steps before FASA acts (default per family)")
    fc.add_argument("--freecure-face-parser", default=None, help="face-parsing model (hub id or folder)")
    met = p.add_argument_group("metrics")
    met.add_argument("--metrics", default=None,
                     help=f"comma-separated, from {', '.join(sorted(METRICS))} (default clip_t,clip_i,ti_clip)")
    met.add_argument("--clip-model", default="builtin:toy-clip",
                     help="open_clip model for clip_t/clip_i/ti_clip: builtin:toy-clip (default, CPU, offline), a "
                          "local open_clip folder, hf-hub:org/name, or a model name with --clip-pretrained")
    met.add_argument("--clip-pretrained", default=None, help="e.g. openai (with --clip-model ViT-B-32)")
    met.add_argument("--blip-model", default=None,
                     help="blip2_t: hub id or local folder (default: Salesforce/blip-itm-large-coco, or "
                          "Salesforce/blip2-itm-vit-g with --blip-variant blip2)")
    met.add_argument("--blip-variant", default="blip1-itc", choices=("blip1-itc", "blip2"),
                     help="blip1-itc: what ClassDiffusion's code calls BLIP2-T; blip2: a true BLIP-2 ITC score")
    met.add_argument("--dino-model", default=None,
                     help="for dino_i: hub id (e.g. facebook/dino-vits16, from the local cache) or local folder")
    met.add_argument("--detector", default="google/owlvit-base-patch32",
                     help="cp_clip's OWL-ViT detector: hub id (from the local Hugging Face cache when offline) or a "
                          "local transformers folder (default google/owlvit-base-patch32)")
    met.add_argument("--detection-threshold", type=float, default=0.1,
                     help="cp_clip: detector boxes not above this score are dropped (default 0.1)")
    met.add_argument("--fid-reference", default=None, metavar="DIR",
                     help="a folder of reference images (e.g. a style's artworks): adds set-level FID and KID of "
                          "each model's images against it to summary.json and report.html")
    met.add_argument("--fid-feature", default="inception",
                     help="FID/KID feature extractor: inception (default; needs torch-fidelity and its weights), "
                          "builtin:toy-clip, or a local DINO / open_clip folder (offline; not comparable with "
                          "Inception FIDs)")
    met.add_argument("--batch-size", type=int, default=32, help="metric batch size")
    met.add_argument("--bootstrap", type=int, default=0,
                     help="0: normal-approximation 95%% CIs (default); N: percentile bootstrap with N resamples")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin/.ckpt) weights of results and metric models: they can run arbitrary "
                        "code when loaded, so only for files you trust (default: safetensors only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from accelerate import PartialState

        state = PartialState(cpu=args.device == "cpu")
        given = {"attributes": args.freecure_attributes, "mask_source": args.freecure_mask_source,
                 "omega": args.freecure_omega, "fasa_start": args.freecure_fasa_start,
                 "face_parser": args.freecure_face_parser}
        freecure = FreeCureOptions(**{k: v for k, v in given.items() if v is not None})  # the rest: defaults
        cfg = EvalConfig(
            models=args.model, images=args.images, prompts=args.prompts, images_per_prompt=args.images_per_prompt,
            seed=args.seed, metrics=args.metrics, out=args.out, concepts=args.concept, references=args.references,
            generation=GenerationOptions(steps=args.steps, guidance=args.guidance, height=args.height,
                                         width=args.width, device=args.device, dtype=args.dtype,
                                         negative_prompt=args.negative_prompt, freecure=freecure,
                                         allow_pickle=args.allow_pickle),
            metric_options=MetricOptions(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                                         dino_model=args.dino_model, blip_model=args.blip_model,
                                         blip_variant=args.blip_variant, detector=args.detector,
                                         detection_threshold=args.detection_threshold, fid_feature=args.fid_feature,
                                         device=args.device or str(state.device), batch_size=args.batch_size,
                                         allow_pickle=args.allow_pickle),
            bootstrap=args.bootstrap, fid_reference=args.fid_reference, freecure=args.freecure,
            progress=not args.no_progress)
        summary = evaluate(cfg, state)
    except (UserError, ImageLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        for model, data in summary["models"].items():
            scores = ", ".join(f"{m} {v['mean']:.4f}" if v["mean"] is not None else f"{m} -"
                               for m, v in data["overall"].items())
            fk = data.get("fid_kid")
            if fk:
                scores += f"; fid {fk['fid']:.4f}, kid {fk['kid']:.6f} ± {fk['kid_std']:.6f}"
            print(f"{model}: {data['images']} images; {scores}")
        print(f"done: {args.out}/results.csv, summary.json, report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
