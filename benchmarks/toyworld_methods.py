"""Personalization methods compared on the toy world, read by the oracle (CPU, no downloads).

    python benchmarks/toyworld_methods.py [--out outputs/methods] [--runs dreambooth-lora lora-token-spl ...]
    python benchmarks/toyworld_methods.py --base builtin:toy-flux      # the same runs on the FLUX toy model

Each run trains one preset on the personal teal dog (or reuses a finished output folder), then generates
"a photo of {V} dog <where>" for the 8 scenes x 4 seeds and "a photo of a dog <where>" (no identifier) for the
same scenes. Printed per run:

- subject: the oracle recognises the personal dog in the personalized images (fidelity);
- scene: the scene the prompt asked for (composition: what SPL is meant to keep);
- drift: the plain class prompt shows the personal dog (the class has collapsed onto the subject);
plus each figure's ratio to the first run. Grids of every run go to ``--out``, and ``methods.png`` shows seed 0 of
every scene for every run (the README's picture).

``--base builtin:toy-flux`` trains each preset on the toy world's FLUX model with what the family changes
(:data:`BASES`: flow matching with FLUX's logit-normal timesteps and resolution shift, its embedded guidance 3.5,
no min-SNR) and everything else the same; generation reads it at embedded guidance 5 (the CFG scale of the SD runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

TOKEN = ["concepts.0.identifier=<new1>", "concepts.0.initializer_token=dog"]
RUNS = {  # name -> (preset, overrides)
    "dreambooth-lora": ("configs/quickstart.yaml", []),
    "lora-token": ("configs/quickstart.yaml", TOKEN),
    "lora-token-spl": ("configs/quickstart.yaml", TOKEN + ["method.spl.weight=1.0"]),
    "custom-diffusion": ("configs/quickstart_classdiffusion.yaml", ["method.spl="]),
    "classdiffusion": ("configs/quickstart_classdiffusion.yaml", []),
    "classdiffusion-0.3": ("configs/quickstart_classdiffusion.yaml", ["method.spl.weight=0.3"]),
    "classdiffusion-0.1": ("configs/quickstart_classdiffusion.yaml", ["method.spl.weight=0.1"]),
}
SEEDS = 4
# base model -> overrides every preset gets on it (the toy presets are written for builtin:toy)
BASES = {
    "builtin:toy": [],
    "builtin:toy-flux": ["model.pretrained=builtin:toy-flux", "training.snr_gamma=",
                         "training.flow_matching.timestep_sampling=logit_normal",
                         "training.flow_matching.shift=resolution", "training.guidance_scale=3.5",
                         "data.class_generation_guidance=3.5"],
}


def train_or_reuse(name: str, out_root: Path, base: str = "builtin:toy") -> Path:
    from t2i_personal.config import load_config
    from t2i_personal.training.trainer import train

    path, overrides = RUNS[name]
    out = out_root / name
    if not (out / "personalization.json").exists():
        cfg = load_config(path, BASES[base] + overrides + [f"training.output_dir={out}", "training.report_to=none",
                                                           "validation.prompts=[]"])
        train(cfg)
    return out


@torch.no_grad()
def evaluate(out: Path) -> tuple[dict, np.ndarray]:
    from t2i_personal.families import call_defaults
    from t2i_personal.inference.pipeline import load_personalized
    from t2i_personal.toyworld import world
    from t2i_personal.toyworld.oracle import Oracle

    record = json.loads((out / "personalization.json").read_text())
    identifier = record["concepts"][0]["identifier"]
    pipe = load_personalized(out)
    pipe.set_progress_bar_config(disable=True)
    scenes = list(world.SCENES)
    personal = [f"a photo of {identifier} dog {world.WHERE[s]}" for s in scenes for _ in range(SEEDS)]
    plain = [f"a photo of a dog {world.WHERE[s]}" for s in scenes for _ in range(SEEDS)]
    asked = [s for s in scenes for _ in range(SEEDS)]
    images = []
    for prompts in (personal, plain):
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        batch = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, height=64, width=64,
                     output_type="np", **call_defaults(pipe)).images
        images.append(np.clip(np.rint(batch * 255), 0, 255).astype(np.uint8))
    oracle = Oracle.from_pretrained()
    read_personal, read_plain = oracle.read(images[0]), oracle.read(images[1])
    metrics = {
        "subject": float(np.mean([r["subject"] == "dog" for r in read_personal])),
        "scene": float(np.mean([r["scene"] == s for r, s in zip(read_personal, asked)])),
        "drift": float(np.mean([r["subject"] == "dog" for r in read_plain])),
        "plain_scene": float(np.mean([r["scene"] == s for r, s in zip(read_plain, asked)])),
    }
    return metrics, np.concatenate(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/methods (outputs/methods-flux)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS)[:5], choices=list(RUNS))
    parser.add_argument("--base", default="builtin:toy", choices=list(BASES))
    args = parser.parse_args()
    args.out = args.out or Path("outputs/methods" + ("-flux" if args.base != "builtin:toy" else ""))
    from t2i_personal.toyworld.reports import image_grid, labelled_rows

    results, seed0 = {}, {}
    for name in args.runs:
        started = time.perf_counter()
        out = train_or_reuse(name, args.out, args.base)
        metrics, images = evaluate(out)
        metrics["seconds"] = time.perf_counter() - started
        results[name] = metrics
        image_grid(images, columns=SEEDS * 4, scale=2).save(args.out / f"{name}.png")
        seed0[name] = [images[:len(images) // 2:SEEDS], images[len(images) // 2::SEEDS]]  # personal | plain, seed 0
    from t2i_personal.toyworld import world

    labelled_rows(seed0, [f"a photo of [V] dog <{', '.join(world.SCENES)}>", "a photo of a dog <same scenes> (drift?)"]
                  ).save(args.out / "methods.png")
    first = results[args.runs[0]]
    print(f"{'run':24s} {'subject':>8s} {'scene':>8s} {'drift':>8s} {'plain scene':>12s}   ratios to {args.runs[0]}")
    for name, m in results.items():
        ratios = " ".join(f"{k} x{m[k] / first[k]:.2f}" if first[k] else f"{k} -" for k in ("subject", "scene"))
        print(f"{name:24s} {m['subject']:8.3f} {m['scene']:8.3f} {m['drift']:8.3f} {m['plain_scene']:12.3f}   {ratios}")
    (args.out / "methods.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
