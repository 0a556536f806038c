"""The Train tab's choices as a validated TrainConfig: a preset per kind of concept, the concept, and the advanced
settings as the same dotted overrides the command line takes."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import yaml

from t2i_personal.config import config_to_dict, load_config
from t2i_personal.data.concepts import class_prompt
from t2i_personal.data.priors import default_class_dir
from t2i_personal.errors import ConfigError
from t2i_personal.models.loading import peek_family

from . import ROOT
from .errors import DemoError
from .workspace import Workspace, slug, unique_folder

TOY = "builtin:toy"
# What is being trained -> (preset on the toy world, preset on a real base model). The presets carry the
# method, rank, steps and SPL choice the README recommends for each case.
KINDS = {
    "subject": ("configs/quickstart.yaml", "configs/dreambooth_lora_spl.yaml"),
    "face": ("configs/quickstart_face.yaml", "configs/dreambooth_lora.yaml"),
    "style": ("configs/quickstart_styleforge.yaml", "configs/styleforge_single.yaml"),
}
# Subjects and faces on the flow-matching families (StyleForge's preset has no family-specific options)
FLOW_PRESETS = {"flux": "configs/dreambooth_lora_flux.yaml", "sd3": "configs/dreambooth_lora_sd3.yaml"}
ADVANCED = ("method.name", "method.adapter", "training.max_train_steps", "training.learning_rate", "method.prior",
            "method.spl.weight", "method.lora.rank")


def chosen_advanced(values) -> dict:
    """The advanced settings (in :data:`ADVANCED` order) that were changed: blank or "preset" keeps the preset's."""
    return {k: v for k, v in zip(ADVANCED, values) if v not in (None, "", "preset")}


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from t2i_personal.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def is_vocabulary_word(identifier: str) -> bool:
    """Whether ``identifier`` is one token of the CLIP vocabulary, which every Stable Diffusion text encoder shares
    (and the toy world too): such a word cannot be learned as a new token."""
    return len(_clip_tokenizer()(identifier, add_special_tokens=False).input_ids) == 1


def build_config(workspace: Workspace, kind: str, identifier: str, class_noun: str, base_model: str,
                 instance_dir: str | Path, run_name: str = "", advanced: dict | None = None,
                 auxiliary_dir: str | Path | None = None):
    """The validated TrainConfig for the Train tab's choices: ``kind``'s preset, the concept, and the advanced
    settings as dotted overrides (blank ones keep the preset's). ``auxiliary_dir``: StyleForge's auxiliary images
    (uploaded); the toy world's presets bring their own. Every folder the run writes lies in the work folder."""
    if kind not in KINDS:
        raise DemoError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    base_model = (base_model or TOY).strip()
    preset = ROOT / KINDS[kind][0 if base_model == TOY else 1]
    family = peek_family(base_model)
    if family in FLOW_PRESETS and kind != "style":  # the SD presets' DDPM options do not apply to flow matching
        preset = ROOT / FLOW_PRESETS[family]
    output_dir = unique_folder(workspace.root / "runs", slug(run_name or f"{kind}-{identifier}-{class_noun}"))
    text = {"model.pretrained": base_model, "concepts.0.identifier": identifier, "concepts.0.class_noun": class_noun,
            "concepts.0.instance_dir": str(instance_dir), "training.output_dir": str(output_dir)}
    # free text is quoted, so "sks #1" or "true" stay the words typed rather than YAML comments or booleans
    overrides = [f"{key}={json.dumps(value)}" for key, value in text.items()]
    for key, value in (advanced or {}).items():
        if key not in ADVANCED:
            raise DemoError(f"unknown advanced setting {key!r}; settings: {', '.join(ADVANCED)}")
        if value is not None and str(value).strip() != "":
            overrides.append(f"{key}={value}")
    try:
        config = load_config(preset, overrides)
    except ConfigError as exc:
        raise DemoError(str(exc)) from exc
    workspace.inside(Path(config.training.output_dir))
    for concept in config.concepts:
        # checked here, not by the trainer: there it fails only after the model is loaded and class images are made
        if concept.initializer_token and is_vocabulary_word(concept.identifier):
            raise DemoError(f"identifier {concept.identifier!r} is already a word of the CLIP vocabulary, and the "
                            f"{kind} preset on this base model learns the identifier as a new token: type a fresh "
                            f"string such as '<{concept.identifier}>' (and write it in your prompts), or choose kind "
                            "'face' (DreamBooth-LoRA on a rare word such as 'sks', no learned token)")
        _place_prior(workspace, config, concept, auxiliary_dir)
    return config


def _place_prior(workspace: Workspace, config, concept, auxiliary_dir) -> None:
    """Where ``concept``'s prior images are: generated ones in the work folder, read-only ones where they are."""
    if config.method.prior == "class_images":
        # named by the library's cache key (everything that changes the images), so later runs reuse them
        data = config.data
        cached = default_class_dir(config.model.pretrained, class_prompt(concept), data.resolution,
                                   data.class_generation_steps, data.class_generation_guidance,
                                   revision=config.model.revision, variant=config.model.variant,
                                   seed=config.training.seed)
        concept.class_dir = str(workspace.root / "class-images" / cached.name)
    elif config.method.prior == "auxiliary":  # read only: the upload, or the toy preset's own folder
        if auxiliary_dir:
            concept.class_dir = str(auxiliary_dir)
        elif concept.class_dir and (ROOT / concept.class_dir).is_dir():
            concept.class_dir = str(ROOT / concept.class_dir)
        else:
            raise DemoError("StyleForge on this base model needs auxiliary images (15-20 pictures in a general "
                            "look of the same medium, e.g. digital paintings of people): upload them under "
                            "'auxiliary images', or set prior preservation to none")


def config_yaml(config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
