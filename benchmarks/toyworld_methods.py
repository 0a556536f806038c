"""Personalization methods compared on the toy world, read by the oracle (CPU, no downloads), with intervals.

    python benchmarks/toyworld_methods.py                              # eight runs x 3 training seeds, ~40 minutes
    python benchmarks/toyworld_methods.py --quick                      # one training seed: a smoke run
    python benchmarks/toyworld_methods.py --base builtin:toy-flux      # the same runs on the FLUX toy model
    python benchmarks/toyworld_methods.py --runs dreambooth-lora-400 diffusers-script \\
        --diffusers-script train_dreambooth_lora.py                    # diffusers' own example script beside ours
    python benchmarks/toyworld_methods.py --run-seeds dreambooth-lora=8   # where one more quickstart run lands

The runs (:data:`RUNS`): the quickstart (``dreambooth-lora``, 600 steps) and, at the 400 steps the methods are
compared at, DreamBooth-LoRA (the first run: the baseline of the paired differences), LoRA with a learned token
with and without SPL, Custom Diffusion, ClassDiffusion at SPL weights 1, 0.3 and 0.1; ``lora-token-250`` and
``diffusers-script`` on request.

Each run trains one preset on the personal teal dog once per training seed (``training.seed``; a finished output
folder is reused, and so is its reading unless ``--reread``; a folder trained with other settings is refused), then
generates "a photo of {V} dog <where>" for the 8 scenes x ``--images-per-scene`` noise seeds and "a photo of a dog
<where>" (no identifier) for the same scenes and seeds. Read by the oracle, per image:

- subject: the oracle recognises the personal dog in the personalized image (fidelity);
- scene: the scene the prompt asked for (composition: what SPL is meant to keep);
- drift: the plain class prompt shows the personal dog (the class has collapsed onto the subject).

Printed per run and figure: the mean over training seeds and images with its 95 % interval (a two-level bootstrap:
training seeds, then images within each; :mod:`t2i_personal.evaluation.intervals`), and the paired difference from
the first run (same training seeds, same prompts and noise) with its interval; "~0" marks a difference whose
interval contains 0. ``--out``/methods.json keeps every image's outcome, the intervals, the command, the commit
and the date (``benchmarks/readme_tables.py`` writes the README's table from it); ``methods.png`` shows seed 0 of
every scene for every run (training seed 0).

``--base builtin:toy-flux`` trains each preset on the toy world's FLUX model with what the family changes
(:data:`BASES`: flow matching with FLUX's logit-normal timesteps and resolution shift, its embedded guidance 3.5,
no min-SNR; ``configs/*_flux.yaml`` are exactly these) and everything else the same; generation reads it at
embedded guidance 5 (the CFG scale of the SD runs).

``diffusers-script`` is the reference recipe: diffusers' own ``examples/dreambooth/train_dreambooth_lora.py`` (pass
its path; it is not part of the pip package) run on builtin:toy's folder with its own defaults (LoRA rank 4, lr
5e-4, no min-SNR, no flip, 100 class images at the pipeline's 50 steps and CFG 7.5) and only what the task sets:
the photos, the prompts, prior preservation, 64 px, 400 steps (as the baseline run), the seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import print_summary, record  # noqa: E402
TOKEN = ["concepts.0.identifier=<new1>", "concepts.0.initializer_token=dog"]
AT_400 = ["training.max_train_steps=400"]  # the methods are compared at the quickstart's former 400 steps
RUNS = {  # name -> (preset, overrides); None: diffusers' own script (--diffusers-script)
    "dreambooth-lora-400": ("configs/quickstart.yaml", AT_400),
    "dreambooth-lora": ("configs/quickstart.yaml", []),  # the quickstart: 600 steps, chosen from these runs
    "lora-token": ("configs/quickstart.yaml", AT_400 + TOKEN),
    "lora-token-spl": ("configs/quickstart.yaml", AT_400 + TOKEN + ["method.spl.weight=1.0"]),
    "custom-diffusion": ("configs/quickstart_classdiffusion.yaml", ["method.spl="]),
    "classdiffusion": ("configs/quickstart_classdiffusion.yaml", []),
    "classdiffusion-0.3": ("configs/quickstart_classdiffusion.yaml", ["method.spl.weight=0.3"]),
    "classdiffusion-0.1": ("configs/quickstart_classdiffusion.yaml", ["method.spl.weight=0.1"]),
    "lora-token-250": ("configs/quickstart.yaml", TOKEN + ["training.max_train_steps=250"]),  # a quickstart candidate
    "diffusers-script": None,
}
DEFAULT_RUNS = ["dreambooth-lora-400", "dreambooth-lora", "lora-token", "lora-token-spl", "custom-diffusion",
                "classdiffusion", "classdiffusion-0.3", "classdiffusion-0.1"]
METRICS = ("subject", "scene", "drift")
TRAIN_SEEDS = 3
IMAGES_PER_SCENE = 8
SEEDS = 4  # images per scene of one-off readings (benchmarks/toyworld_real_photos.py)
# base model -> overrides every preset gets on it (the toy presets are written for builtin:toy)
BASES = {
    "builtin:toy": [],
    "builtin:toy-flux": ["model.pretrained=builtin:toy-flux", "training.snr_gamma=",
                         "training.flow_matching.timestep_sampling=logit_normal",
                         "training.flow_matching.shift=resolution", "training.guidance_scale=3.5",
                         "data.class_generation_guidance=3.5"],
}


def train_or_reuse(name: str, out_root: Path, base: str = "builtin:toy", seed: int = 0,
                   diffusers_script: Path | None = None) -> Path:
    out = out_root / name / f"seed-{seed}"
    if RUNS[name] is None:
        return run_diffusers_script(diffusers_script, out, seed, base)
    path, overrides = RUNS[name]
    return train_preset(path, out, base, seed, overrides)


def train_preset(preset: str, out: Path, base: str, seed: int, overrides: list[str] = ()) -> Path:
    """Train ``preset`` (a path under the repository) on ``base`` with ``training.seed=seed`` into ``out``, without
    validation or a progress bar, unless a finished result is already there."""
    from t2i_personal.config import load_config

    config = load_config(ROOT / preset, BASES[base] + list(overrides) + [
        f"training.output_dir={out}", f"training.seed={seed}", "training.report_to=none", "validation.prompts=[]",
        "training.progress_bar=false"])
    if (out / "personalization.json").exists():
        changed = _changed_settings(load_config(out / "config.yaml").model_dump(mode="json"),
                                    config.model_dump(mode="json"))
        if changed:  # e.g. the preset changed since: reusing the folder would measure the old recipe
            raise SystemExit(f"{out} was trained with other settings than {preset} gives now ({', '.join(changed)}): "
                             "delete the folder to train it again, or pass another --out")
        return out
    from t2i_personal.training.trainer import train

    train(config)
    return out


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, leaving out the output folder and validation (off in these runs)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in ("training.output_dir", "validation"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_settings(a, b, name + ".")
        elif a != b:
            changed.append(f"{name}: {a!r} -> {b!r}")
    return changed


def run_diffusers_script(script: Path | None, out: Path, seed: int, base: str) -> Path:
    """diffusers' ``train_dreambooth_lora.py``, as its README runs it, with its defaults (module docstring)."""
    if script is None or not Path(script).is_file():
        raise SystemExit("the diffusers-script run needs --diffusers-script PATH: diffusers' "
                         "examples/dreambooth/train_dreambooth_lora.py from a checkout of the diffusers version "
                         "installed here")
    if base != "builtin:toy":
        raise SystemExit("the diffusers-script run is the SD-1.x script (train_dreambooth_lora.py): --base builtin:toy")
    if (out / "pytorch_lora_weights.safetensors").exists():
        return out
    from t2i_personal.models.loading import PRETRAINED_BUILTINS

    command = [sys.executable, str(script), f"--pretrained_model_name_or_path={PRETRAINED_BUILTINS['toy']}",
               f"--instance_data_dir={ROOT / 't2i_personal/toyworld/assets/subjects/dog'}",
               "--instance_prompt=a photo of sks dog", "--with_prior_preservation",
               f"--class_data_dir={out / 'class_images'}", "--class_prompt=a photo of a dog",
               "--resolution=64", "--max_train_steps=400", f"--seed={seed}", f"--output_dir={out}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True)
    (out / "command.json").write_text(json.dumps({"command": command}, indent=2) + "\n")
    return out


def load_for_reading(out: Path):
    """(pipeline, identifier) of a finished run: our results through load_personalized, the diffusers script's
    LoRA file through diffusers' own ``load_lora_weights`` on the base model."""
    if (out / "personalization.json").exists():
        from t2i_personal.inference.pipeline import load_personalized

        record = json.loads((out / "personalization.json").read_text())
        return load_personalized(out), record["concepts"][0]["identifier"]
    from diffusers import StableDiffusionPipeline

    from t2i_personal.models.loading import PRETRAINED_BUILTINS

    pipe = StableDiffusionPipeline.from_pretrained(PRETRAINED_BUILTINS["toy"], safety_checker=None)
    pipe.load_lora_weights(out)
    return pipe, "sks"


def evaluate_or_reuse(out: Path, images_per_scene: int, reread: bool = False) -> tuple[dict, np.ndarray]:
    """:func:`evaluate`, kept in ``out``/reading-<images per scene>.npz: a rerun that adds runs or seeds reads only
    what is new. A reading older than the run's weights (a retrained folder) is read again."""
    cache = out / f"reading-{images_per_scene}.npz"
    weights = [p for p in out.iterdir() if p.suffix in (".json", ".safetensors")]
    if not reread and cache.exists() and all(p.stat().st_mtime <= cache.stat().st_mtime for p in weights):
        saved = np.load(cache)
        outcomes = {k[len("outcome_"):]: saved[k].tolist() for k in saved.files if k.startswith("outcome_")}
        metrics = {k: float(np.mean(v)) for k, v in outcomes.items()}
        return {**metrics, "outcomes": outcomes}, saved["images"]
    metrics, images = evaluate(out, images_per_scene)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez_compressed(tmp, images=images, **{f"outcome_{k}": np.asarray(v) for k, v in metrics["outcomes"].items()})
    tmp.replace(cache)
    return metrics, images


@torch.no_grad()
def evaluate(out: Path, images_per_scene: int = SEEDS) -> tuple[dict, np.ndarray]:
    """Per-image outcomes of one finished run (``metrics["outcomes"][name]``: 0/1 per image, scene-major) and their
    means, plus the images (personalized, then plain)."""
    from t2i_personal.families import call_defaults
    from t2i_personal.toyworld import world
    from t2i_personal.toyworld.oracle import Oracle

    pipe, identifier = load_for_reading(out)
    pipe.set_progress_bar_config(disable=True)
    scenes = list(world.SCENES)
    personal = [f"a photo of {identifier} dog {world.WHERE[s]}" for s in scenes for _ in range(images_per_scene)]
    plain = [f"a photo of a dog {world.WHERE[s]}" for s in scenes for _ in range(images_per_scene)]
    asked = [s for s in scenes for _ in range(images_per_scene)]
    images = []
    for prompts in (personal, plain):
        gens = [torch.Generator().manual_seed(i % images_per_scene) for i in range(len(prompts))]
        batch = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, height=64, width=64,
                     output_type="np", **call_defaults(pipe)).images
        images.append(np.clip(np.rint(batch * 255), 0, 255).astype(np.uint8))
    oracle = Oracle.from_pretrained()
    read_personal, read_plain = oracle.read(images[0]), oracle.read(images[1])
    outcomes = {
        "subject": [int(r["subject"] == "dog") for r in read_personal],
        "scene": [int(r["scene"] == s) for r, s in zip(read_personal, asked)],
        "drift": [int(r["subject"] == "dog") for r in read_plain],
        "plain_scene": [int(r["scene"] == s) for r, s in zip(read_plain, asked)],
    }
    metrics = {k: float(np.mean(v)) for k, v in outcomes.items()}
    metrics["outcomes"] = outcomes
    return metrics, np.concatenate(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/methods (outputs/methods-flux)")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS),
                        help="the first is the baseline of the paired differences")
    parser.add_argument("--base", default="builtin:toy", choices=list(BASES))
    parser.add_argument("--train-seeds", type=int, default=TRAIN_SEEDS, help="training seeds per run (0, 1, ...)")
    parser.add_argument("--images-per-scene", type=int, default=IMAGES_PER_SCENE,
                        help="noise seeds per scene and prompt (8 scenes)")
    parser.add_argument("--quick", action="store_true", help="one training seed and 4 images per scene")
    parser.add_argument("--diffusers-script", type=Path, default=None,
                        help="diffusers' examples/dreambooth/train_dreambooth_lora.py, for the diffusers-script run")
    parser.add_argument("--run-seeds", nargs="+", default=[], metavar="RUN=K",
                        help="more training seeds for some runs, e.g. dreambooth-lora=8 (where one more run of the "
                             "quickstart lands needs more than 3); differences pair on the seeds both runs have")
    parser.add_argument("--reread", action="store_true",
                        help="read every run again (default: reuse each finished run's saved reading)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_seeds, args.images_per_scene = 1, 4
    run_seeds = {name: args.train_seeds for name in args.runs}
    for item in args.run_seeds:
        name, _, count = item.partition("=")
        if name not in run_seeds or not count.isdigit() or int(count) < 1:
            parser.error(f"--run-seeds {item!r}: expected RUN=K with RUN one of --runs ({', '.join(args.runs)}) "
                         "and K a positive whole number")
        run_seeds[name] = int(count)
    args.out = args.out or ROOT / ("outputs/methods" + ("-flux" if args.base != "builtin:toy" else ""))
    from t2i_personal.atomic import write_json_atomic
    from t2i_personal.toyworld import world
    from t2i_personal.toyworld.reports import image_grid, labelled_rows

    per_run, seed0, seconds = {}, {}, {}
    n = len(world.SCENES) * args.images_per_scene
    for name in args.runs:
        started, per_run[name] = time.perf_counter(), []
        for seed in range(run_seeds[name]):
            out = train_or_reuse(name, args.out, args.base, seed, args.diffusers_script)
            metrics, images = evaluate_or_reuse(out, args.images_per_scene, args.reread)
            per_run[name].append(metrics)
            image_grid(images, columns=args.images_per_scene * 4, scale=2).save(args.out / name / f"seed-{seed}.png")
            if seed == 0:
                seed0[name] = [images[:n:args.images_per_scene], images[n::args.images_per_scene]]
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {metrics[k]:.2f}" for k in METRICS), flush=True)
        seconds[name] = time.perf_counter() - started
    labelled_rows(seed0, [f"a photo of [V] dog <{', '.join(world.SCENES)}>", "a photo of a dog <same scenes> (drift?)"]
                  ).save(args.out / "methods.png")
    baseline = args.runs[0]
    result = record(benchmark="methods", base=args.base, script="benchmarks/toyworld_methods.py", argv=argv,
                    outcomes={name: [m["outcomes"] for m in seeds] for name, seeds in per_run.items()},
                    baseline=baseline, train_seeds=args.train_seeds, images_per_cell=n, seconds=seconds,
                    run_seeds={k: v for k, v in run_seeds.items() if v != args.train_seeds})
    print_summary(result, list(METRICS))
    write_json_atomic(args.out / "methods.json", result)
    print(f"wrote {args.out / 'methods.json'} and {args.out / 'methods.png'}")


if __name__ == "__main__":
    main()
