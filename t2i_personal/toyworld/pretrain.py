"""Train the toy world's models: ``python -m t2i_personal.toyworld.pretrain {generator,clip,face-parser,oracle,all}``.

Every run is seeded and writes its settings, loss curve and a picture next to the weights. ``--time-budget``
caps a stage's wall clock (the steps actually run are recorded, so a run can be repeated without the budget);
``all`` trains the four models in parallel processes, which is how the shipped weights were made (see
``weights/*/training.json``). The recipe defaults are the shipped ones; each fits well under an hour on 2 CPU
cores with the time budgets below, and takes minutes on a GPU.

    python -m t2i_personal.toyworld.pretrain all --device cuda --out-root /tmp/toy-weights
    python -m t2i_personal.toyworld.pretrain oracle --steps 500 --time-budget 600
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
# name -> (module, output folder, recipe). Budgets are seconds of wall clock per stage.
MODELS = {
    "generator": ("generator", "toy-sd", dict(num_images=60000, vae_steps=4000, vae_batch_size=64, vae_lr=1e-3,
                                             vae_time_budget_s=600, unet_steps=30000, unet_batch_size=128,
                                             unet_lr=5e-4, unet_time_budget_s=2400)),
    "clip": ("clip", "clip", dict(steps=4000, batch_size=256, num_images=30000, time_budget_s=1800)),
    "face-parser": ("face_parser", "face-parser", dict(steps=3000, batch_size=64, num_images=8000,
                                                       time_budget_s=1200)),
    "oracle": ("oracle", "oracle", dict(steps=4000, batch_size=256, num_images=40000, time_budget_s=1800)),
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


def train_one(name: str, out_root: Path, device: str, seed: int, overrides: dict) -> dict:
    module_name, folder, recipe = MODELS[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    kwargs = {**recipe, **overrides}
    started = time.perf_counter()
    result = module.train(out_root / folder, device=device, seed=seed, **kwargs)
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s -> {out_root / folder}", flush=True)
    return result


def train_all(out_root: Path, device: str, seed: int, time_scale: float) -> int:
    """One process per model (they share the device); returns the number of failures."""
    procs = {}
    for name, (_, folder, recipe) in MODELS.items():
        cmd = [sys.executable, "-m", __spec__.name, name, "--device", device, "--seed", str(seed),
               "--out-root", str(out_root)]
        for key, value in recipe.items():
            if key.endswith("time_budget_s"):
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
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="with 'all': multiply every time budget (e.g. 0.1 on a GPU)")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out_root.mkdir(parents=True, exist_ok=True)
    if args.model == "all":
        return 1 if train_all(args.out_root, device, args.seed, args.time_scale) else 0
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
