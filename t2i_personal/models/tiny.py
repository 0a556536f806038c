"""Built-in tiny models (``builtin:tiny-sd``, ``-sd2``, ``-sdxl``, ``-sd3``, ``-flux``, ``-flux-schnell``) and the
real architectures with random weights for GPU benchmarks (``builtin:sd15-arch``, ``sd3-arch``, ``flux-arch``).

Architectures are data: each is a JSON file in ``models/configs/`` holding the diffusers/transformers configs and
its ``family``, which builds the components. Weights are random but seeded, so every machine builds bit-identical
components without a download.
"""

from __future__ import annotations

import json
from importlib import resources

import diffusers
import torch

from ..errors import ModelLoadError
from ..families import family_named
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


def seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tokenizer_from_spec(spec: dict, pad_key: str):
    return build_clip_tokenizer(pad_token=spec.get(pad_key, EOS))


def scheduler_from_spec(spec: dict):
    config = dict(spec["scheduler"])
    return getattr(diffusers, config.pop("_class_name")).from_config(config)


def build_tiny(name: str, seed: int = 0) -> Components:
    spec = builtin_spec(name)
    return family_named(spec["family"]).build_tiny(spec, seed, source=f"builtin:{name}")
