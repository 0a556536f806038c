"""Built-in tiny models (``builtin:tiny-sd``, ``builtin:tiny-sd2``, ``builtin:tiny-sdxl``).

Architectures are data: each is a JSON file in ``models/configs/`` holding the diffusers/transformers configs.
Weights are random but seeded, so every machine builds bit-identical components without a download.
"""

from __future__ import annotations

import json
from importlib import resources

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import ModelLoadError
from .components import Components
from .tokenizer import EOS, build_clip_tokenizer


def builtin_names() -> list[str]:
    folder = resources.files(__package__) / "configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def builtin_spec(name: str) -> dict:
    if name not in builtin_names():
        raise ModelLoadError(f"unknown built-in model 'builtin:{name}'; available: builtin:toy, "
                             + ", ".join(f"builtin:{n}" for n in builtin_names()))
    return json.loads((resources.files(__package__) / "configs" / f"{name}.json").read_text())


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny(name: str, seed: int = 0) -> Components:
    spec = builtin_spec(name)
    unet = _seeded(seed, lambda: UNet2DConditionModel(**spec["unet"]))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**spec["vae"]))
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])))
    tokenizer = build_clip_tokenizer(pad_token=spec.get("tokenizer_pad_token", EOS))
    scheduler_cfg = dict(spec["scheduler"])
    scheduler = getattr(diffusers, scheduler_cfg.pop("_class_name")).from_config(scheduler_cfg)
    text_encoder_2 = tokenizer_2 = None
    if "text_encoder_2" in spec:
        text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])))
        tokenizer_2 = build_clip_tokenizer(pad_token=spec.get("tokenizer_2_pad_token", EOS))
    return Components(
        family=spec["family"], unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, source=f"builtin:{name}",
    )
