"""Train the toy world's models: ``python -m t2i_personal.toyworld.pretrain {generator,generator-flux,clip,face-parser,oracle,segmenter,all}``.

Every run is seeded and writes its settings, loss curve and a picture next to the weights. Each stage stops at
its step count or its time budget (``time_budget_s``), whichever comes first; the steps actually run are
recorded in ``training.json``, so ``--set steps=N --set time_budget_s=null`` repeats a run exactly. ``all``
trains every model in parallel processes, which is how the first four shipped models were made (GPU recipe); the
FLUX generator and the segmenter were trained on 2 CPU cores (their ``training.json`` says how).

    python -m t2i_personal.toyworld.pretrain all --device cuda --out-root /tmp/toy-weights
    python -m t2i_personal.toyworld.pretrain oracle --device cpu --set steps=500 --set time_budget_s=null
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WEIGHTS_ROOT = Path(__file__).parent / "weights"
# name -> (module, output folder). Recipes below: settings passed to the module's ``train``.
MODELS = {"generator": ("generator", "toy-sd"), "generator-flux": ("flux_generator", "toy-flux"),
          "clip": ("clip", "clip"), "face-parser": ("face_parser", "face-parser"), "oracle": ("oracle", "oracle"),
          "segmenter": ("segmenter", "segmenter")}
# The GPU recipe made the first four shipped models (at once on one GPU, about 7 minutes); the generator then
# continued from its own weights (``init_from``), each run's command in its training.json. The CPU recipe keeps each
# model under 45 minutes on 2 cores with smaller batches; its models are weaker (see the README).
RECIPES = {
    "gpu": {
        "generator": dict(num_images=60000, vae_steps=20000, vae_batch_size=128, vae_lr=1e-3, vae_time_budget_s=60,
                          unet_steps=60000, unet_batch_size=256, unet_lr=6e-4, unet_time_budget_s=170),
        "generator-flux": dict(num_images=60000, steps=60000, batch_size=256, lr=6e-4, time_budget_s=600),
        "clip": dict(steps=100000, batch_size=1024, lr=2e-3, num_images=60000, time_budget_s=230),
        "face-parser": dict(steps=30000, batch_size=128, num_images=12000, time_budget_s=150),
        "oracle": dict(steps=30000, batch_size=512, lr=3e-3, num_images=80000, time_budget_s=150),
        "segmenter": dict(steps=20000, batch_size=128, num_images=20000, time_budget_s=150),
    },
    "cpu": {
        "generator": dict(num_images=30000, vae_steps=3000, vae_batch_size=32, vae_lr=1e-3, vae_time_budget_s=600,
                          unet_steps=20000, unet_batch_size=64, unet_lr=5e-4, unet_time_budget_s=2100),
        "generator-flux": dict(num_images=30000, steps=20000, batch_size=64, lr=5e-4, time_budget_s=3600),
        "clip": dict(steps=4000, batch_size=128, num_images=20000, time_budget_s=2400),
        "face-parser": dict(steps=3000, batch_size=32, num_images=6000, time_budget_s=2400),
        "oracle": dict(steps=4000, batch_size=64, num_images=30000, time_budget_s=2400),
        "segmenter": dict(steps=4000, batch_size=32, num_images=8000, time_budget_s=1800),
    },
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def settings_of(name: str) -> list[str]:
    """The keyword arguments of the model's ``train`` that ``--set`` may change."""
    module = importlib.import_module(f"{__package__}.{MODELS[name][0]}")
    params = inspect.signature(module.train).parameters
    return [p for p in params if p not in ("out_dir", "device", "seed")]


def recipe_for(name: str, device: str) -> dict:
    return dict(RECIPES["gpu" if device.startswith("cuda") else "cpu"][name])


def train_one(name: str, out_root: Path, device: str, seed: int, overrides: dict) -> dict:
    module_name, folder = MODELS[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    kwargs = {**recipe_for(name, device), **overrides}
    started = time.perf_counter()
    result = module.train(out_root / folder, device=device, seed=seed, **kwargs)
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s -> {out_root / folder}", flush=True)
    return result


def train_all(out_root: Path, device: str, seed: int, time_scale: float, skip: tuple[str, ...] = ()) -> int:
    """One process per model (they share the device); returns the number of failures."""
    procs = {}
    for name, (_, folder) in MODELS.items():
        if name in skip:
            continue
        cmd = [sys.executable, "-m", __spec__.name, name, "--device", device, "--seed", str(seed),
               "--out-root", str(out_root)]
        for key, value in recipe_for(name, device).items():
            if key.endswith("time_budget_s") and time_scale != 1.0:
                cmd += ["--set", f"{key}={value * time_scale:.0f}"]
        log = open(out_root / f"{folder}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    failures = 0
    for name, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        print(f"[{name}] exit {code}", flush=True)
        failures += code != 0
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2i_personal.toyworld.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=[*MODELS, "all"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-root", type=Path, default=WEIGHTS_ROOT,
                        help=f"folder that receives one sub-folder per model (default: {WEIGHTS_ROOT})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting, e.g. --set steps=500 --set time_budget_s=null")
    parser.add_argument("--skip", default="", help="with 'all': comma-separated models not to train")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="with 'all': multiply every time budget (e.g. 0.1 on a GPU)")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out_root.mkdir(parents=True, exist_ok=True)
    if args.model == "all":
        skip = tuple(filter(None, args.skip.split(",")))
        if unknown := set(skip) - set(MODELS):
            parser.error(f"--skip: unknown model(s) {', '.join(sorted(unknown))}; models: {', '.join(MODELS)}")
        return 1 if train_all(args.out_root, device, args.seed, args.time_scale, skip) else 0
    overrides = {}
    valid = settings_of(args.model)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        if key not in valid:
            parser.error(f"unknown setting {key!r} for {args.model}; settings: {', '.join(valid)}")
        overrides[key] = _parse_value(value)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // (4 if device.startswith("cuda") else 1)))
    train_one(args.model, args.out_root, device, args.seed, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
