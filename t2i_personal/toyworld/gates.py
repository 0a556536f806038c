"""Quality gates of the shipped toy-world models (``python benchmarks/toyworld_gates.py``).

| gate | measured on | threshold |
|---|---|---|
| generator: oracle class / scene / colour accuracy, accessory presence | held-out (class, colour, scene) prompts, 25 steps (toy-sd: DDIM, CFG 5; toy-flux: its Euler sampler, embedded guidance 5) | 0.90 / 0.85 / 0.75 / 0.70 |
| VAE reconstruction PSNR | fresh world renders | 28 dB |
| evaluation CLIP: right caption among 10 | fresh world renders | 0.80 |
| face parser: mean IoU of hair, glasses, hat | fresh faces | 0.70 |
| subject segmenter: mean IoU of the world's classes | fresh cluttered composites | 0.80 |

Held-out prompts name triples that pretraining never showed, so the generator must compose, not recall.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import world

THRESHOLDS = {"class_accuracy": 0.90, "scene_accuracy": 0.85, "colour_accuracy": 0.75, "accessory_presence": 0.70,
              "vae_psnr_db": 28.0, "clip_retrieval_top1_of_10": 0.80, "face_parser_mean_iou": 0.70,
              "segmenter_mean_iou": 0.80}
GENERATOR_GATES = ("class_accuracy", "scene_accuracy", "colour_accuracy", "accessory_presence")
GUIDANCE_SCALE = 5.0
INFERENCE_STEPS = 25


def held_out_scenes(n: int, seed: int = 0) -> list[world.Scene]:
    """``n`` scenes cycling through the held-out triples; half of the animate ones ask for one accessory."""
    rng = random.Random(seed)
    combos = world.held_out_combinations()
    scenes = []
    for i in range(n):
        cls, colour, scene = combos[i % len(combos)]
        s = world.sample_scene(rng, cls=cls, colour=colour, scene=scene, allow_held_out=True, accessory_rate=0.0)
        if cls in world.ANIMATE and rng.random() < 0.5:
            accessory = rng.choice(("hat", "glasses", "scarf"))
            value = {"hat": rng.choice(world.HAT_COLOURS), "glasses": True,
                     "scarf": rng.choice(world.SCARF_COLOURS)}[accessory]
            s = replace(s, **{accessory: value})
        scenes.append(s)
    return scenes


def generate(prompts: list[str], *, seed: int = 0, device: str = "cpu", batch_size: int = 64,
             guidance_scale: float = GUIDANCE_SCALE, steps: int = INFERENCE_STEPS, pretrained: str = "builtin:toy",
             lora_dir: str | None = None) -> np.ndarray:
    """uint8 (N, 64, 64, 3): samples of ``prompts`` from the base model (loaded as a user would): DDIM for DDPM
    models, the model's own flow-matching sampler (and the family's call settings, e.g. T5's window) otherwise."""
    from diffusers import DDIMScheduler

    from ..families import call_defaults
    from ..models.loading import load_components

    comps = load_components(pretrained)
    flow = type(comps.scheduler).__name__.startswith("FlowMatch")
    pipe = comps.pipeline(**({} if flow else {"scheduler": DDIMScheduler.from_config(comps.scheduler.config)}))
    pipe = pipe.to(device)
    call_kwargs = call_defaults(pipe)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), batch_size):
        gen = torch.Generator(device).manual_seed(seed + start)
        batch = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=gen, height=64, width=64, output_type="np", **call_kwargs).images
        out.append(np.clip(np.rint(batch * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def score_generations(readings: list[dict], scenes: list[world.Scene]) -> dict[str, float]:
    """Oracle readings vs. what the prompts asked for."""
    cls = np.mean([r["cls"] == s.cls for r, s in zip(readings, scenes)])
    scene = np.mean([r["scene"] == s.scene for r, s in zip(readings, scenes)])
    colour = np.mean([r["colour"] == s.colour for r, s in zip(readings, scenes) if s.cls != "face"])
    asked = [(r, s) for r, s in zip(readings, scenes) if s.hat or s.glasses or s.scarf]
    present = [bool(r["hat"]) if s.hat else bool(r["glasses"]) if s.glasses else bool(r["scarf"]) for r, s in asked]
    return {"class_accuracy": float(cls), "scene_accuracy": float(scene), "colour_accuracy": float(colour),
            "accessory_presence": float(np.mean(present)) if present else float("nan")}


def generator_gates(n: int = 78, *, seed: int = 0, device: str = "cpu", out_dir: str | Path | None = None,
                    model: str = "builtin:toy") -> dict:
    from .oracle import Oracle
    from .reports import image_grid

    scenes = held_out_scenes(n, seed)
    prompts = [world.describe(s, full=True) for s in scenes]
    images = generate(prompts, seed=seed, device=device, pretrained=model)
    readings = Oracle.from_pretrained().read(images)
    result = score_generations(readings, scenes)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=13, scale=2).save(out_dir / "held_out_generations.png")
        (out_dir / "held_out_prompts.txt").write_text(
            "\n".join(f"{i:3d}  {p}  -> oracle: {r['cls']}, {r['colour']}, {r['scene']}"
                      for i, (p, r) in enumerate(zip(prompts, readings))) + "\n")
    return result


def vae_psnr(n: int = 256, seed: int = 99) -> float:
    from ..models.loading import load_components
    from .dataset import render_set
    from .generator import reconstruction_psnr

    vae = load_components("builtin:toy").vae
    return reconstruction_psnr(vae, torch.from_numpy(render_set(n, seed=seed, workers=1).images))


def segmenter_iou(n: int = 200, seed: int = 4242) -> float:
    from .face_parser import parse
    from .segmenter import DEFAULT_PATH, class_iou, composite_set, load_segmenter

    images, truth = composite_set(n, seed=seed)
    return class_iou(parse(*load_segmenter(DEFAULT_PATH), images), truth)["mean"]


def run_gates(*, n_generations: int = 78, n_eval: int = 200, seed: int = 0, device: str = "cpu",
              out_dir: str | Path | None = None, model: str = "builtin:toy") -> dict:
    """All gates (for a generator other than ``builtin:toy``: its generator gates only, the evaluation models
    being shared); returns ``{metric: value}`` plus ``"passed": {metric: bool}``."""
    from .clip import load_toy_clip, retrieval_accuracy
    from .face_parser import load_face_parser, mean_iou

    metrics = generator_gates(n_generations, seed=seed, device=device, out_dir=out_dir, model=model)
    if model != "builtin:toy":
        metrics["passed"] = {k: bool(metrics[k] >= THRESHOLDS[k]) for k in GENERATOR_GATES}
        return metrics
    metrics["vae_psnr_db"] = vae_psnr()
    model, preprocess, tokenizer = load_toy_clip()
    metrics["clip_retrieval_top1_of_10"] = retrieval_accuracy(model, preprocess, tokenizer, n=n_eval)
    parser_model, processor = load_face_parser()
    metrics["face_parser_mean_iou"] = mean_iou(parser_model, processor, n=n_eval)["mean"]
    metrics["segmenter_mean_iou"] = segmenter_iou(n_eval)
    metrics["passed"] = {k: bool(metrics[k] >= v) for k, v in THRESHOLDS.items()}
    return metrics
