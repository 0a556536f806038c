"""StyleForge on the toy world: does "zwx style" paint the personal outline-poster style, and only when asked?

    python benchmarks/toyworld_style.py [--model outputs/quickstart-styleforge] [--out outputs/style] [key=value ...]
    python benchmarks/toyworld_style.py --base builtin:toy-flux     # on the FLUX toy model (outputs/*-flux)

Trains ``configs/quickstart_styleforge.yaml`` first when ``--model`` has no finished result (on ``--base``, with
``toyworld_methods.py``'s overrides for that base). The style statistic is
**palette adherence**: the fraction of pixels whose three channels all lie within 30 of the outline-poster
palette's levels (20, 130, 245) or on its outline colour; the StyleRef images score 1, ordinary world images
far less, and the StyleRef images passed through the toy VAE show the most any generator on it can reach. Printed for the StyleRef images, the base model, the tuned model with "a photo of zwx style, <content>"
and the tuned model with the plain content prompt (style leaking into prompts that do not ask for it), plus the
oracle's class accuracy on the styled images (the content survives) and the styled/base ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toyworld_methods import BASES  # noqa: E402  -- what each toy base changes in a preset

LEVELS = np.array([20, 130, 245])
OUTLINE = np.array([15, 10, 30])
CONTENT_CLASSES = ("face", "dog", "cat", "car", "vase", "teddy bear")


def palette_adherence(images: np.ndarray) -> float:
    """Mean fraction of pixels drawn from the outline-poster palette (uint8 N x H x W x 3)."""
    x = images.astype(np.int32)
    on_level = (np.abs(x[..., None] - LEVELS).min(-1) <= 30).all(-1)
    on_outline = (np.abs(x - OUTLINE) <= 30).all(-1)
    return float((on_level | on_outline).mean())


def contents(n: int, seed: int = 0):
    from t2i_personal.toyworld import world

    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, cls=CONTENT_CLASSES[i % len(CONTENT_CLASSES)], accessory_rate=0.0) for i in range(n)]
    return scenes, [world.describe(s, full=True)[len("a photo of "):] for s in scenes]


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """decode(encode(x)): no generator can paint the style better than its VAE reproduces it."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((out + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


@torch.no_grad()
def sample(pipe, prompts: list[str]) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    from t2i_personal.families import call_defaults

    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, height=64, width=64,
               output_type="np", **call_defaults(pipe)).images
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="builtin:toy", choices=list(BASES))
    parser.add_argument("--model", type=Path, default=None, help="default: outputs/quickstart-styleforge[-flux]")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/style[-flux]")
    parser.add_argument("--n", type=int, default=36)
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run, e.g. training.learning_rate=5e-4")
    args = parser.parse_args()
    suffix = "-flux" if args.base != "builtin:toy" else ""
    args.model = args.model or Path(f"outputs/quickstart-styleforge{suffix}")
    args.out = args.out or Path(f"outputs/style{suffix}")

    from t2i_personal.config import load_config
    from t2i_personal.data.images import load_image_folder
    from t2i_personal.inference.pipeline import load_personalized
    from t2i_personal.methods.styleforge import style_prompt
    from t2i_personal.models.loading import load_components
    from t2i_personal.toyworld.assets import style_dirs
    from t2i_personal.toyworld.oracle import Oracle
    from t2i_personal.toyworld.reports import image_grid
    from t2i_personal.training.trainer import train

    if not (args.model / "personalization.json").exists():
        train(load_config("configs/quickstart_styleforge.yaml", BASES[args.base] + args.overrides + [
            f"training.output_dir={args.model}", "training.report_to=none"]))
    token = json.loads((args.model / "personalization.json").read_text())["concepts"][0]["identifier"]
    scenes, texts = contents(args.n)
    refs = np.stack([np.asarray(img) for folder in style_dirs().values() for _, img in load_image_folder(folder)])
    base_components = load_components(args.base)
    base = sample(base_components.pipeline(), [f"a photo of {t}" for t in texts])
    tuned = load_personalized(args.model)
    styled = sample(tuned, [style_prompt(t, token) for t in texts])
    plain = sample(tuned, [f"a photo of {t}" for t in texts])
    oracle = Oracle.from_pretrained()
    accuracy = {name: float(np.mean([r["cls"] == s.cls for r, s in zip(oracle.read(images), scenes)]))
                for name, images in (("base", base), ("styled", styled), ("plain", plain))}
    styled_key = f"tuned, '{token} style' prompt"
    rows = {"StyleRef images": palette_adherence(refs),
            "StyleRef through the VAE (ceiling)": palette_adherence(reconstruct(base_components.vae, refs)),
            "base model": palette_adherence(base),
            styled_key: palette_adherence(styled), "tuned, plain prompt": palette_adherence(plain)}
    print(f"{'images':36s} {'palette adherence':>18s}")
    for name, value in rows.items():
        print(f"{name:36s} {value:18.3f}")
    print(f"styled / base adherence: x{rows[styled_key] / rows['base model']:.2f}")
    print(f"oracle class accuracy: base {accuracy['base']:.3f}, styled {accuracy['styled']:.3f}, plain {accuracy['plain']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    image_grid(np.concatenate([base[:12], styled[:12], plain[:12]]), columns=12, scale=2).save(args.out / "style.png")
    (args.out / "style.json").write_text(json.dumps({"palette_adherence": rows, "class_accuracy": accuracy}, indent=2) + "\n")


if __name__ == "__main__":
    main()
