"""``load_personalized``: the one way every CLI, the demo and the evaluator turn a trained result into a pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError, ModelLoadError
from ..methods import METHODS
from ..models.components import Components
from ..models.loading import load_components
from ..record import RECORD_NAME, artifact_files, read_record, refuse_pickles


def base_model_config(record: dict, allow_pickle: bool = False) -> ModelConfig:
    """The recorded base model as a ModelConfig. Whether pickles may load is the caller's choice, never the
    record's: a downloaded result saying ``allow_pickle: true`` must not open the door itself."""
    base = {k: v for k, v in record["base_model"].items() if k in ModelConfig.model_fields and k != "allow_pickle"}
    try:
        return ModelConfig(**base, allow_pickle=allow_pickle)
    except ValueError as exc:
        raise ModelLoadError(f"the record's base_model {base} is not a valid model setting: {exc}") from None


def load_personalized_components(output_dir: str | Path, dtype: torch.dtype | None = None,
                                 allow_pickle: bool = False) -> tuple[Components, Path, dict]:
    """The base (or fully fine-tuned) components of a result, the folder holding its artifact, and its record."""
    folder, record = read_record(output_dir)
    refuse_pickles(folder, record, allow_pickle)
    artifact = record["artifact"]
    if artifact["type"] == "pipeline":
        components = load_components(ModelConfig(pretrained=str(folder / artifact["path"]), allow_pickle=allow_pickle),
                                     dtype=dtype)
    else:
        components = load_components(base_model_config(record, allow_pickle), dtype=dtype)
        trained_on = record.get("family")
        if trained_on and trained_on != components.family.name:  # diffusers would skip every key with a warning
            raise ModelLoadError(
                f"{folder}: its {artifact['type']} weights were trained on an {trained_on!r} model, but the base model "
                f"{record['base_model'].get('pretrained')!r} is an {components.family.name!r} model; these weights "
                f"were trained on another base model. Point base_model.pretrained in {RECORD_NAME} at the "
                f"{trained_on} model they were trained on.")
        override = record.get("config", {}).get("training", {}).get("prediction_type")
        if override:  # the adapter learned this parameterisation, whatever the base model's scheduler says
            components.extras["base_prediction_type"] = components.scheduler.config.prediction_type
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config,
                                                                          prediction_type=override)
    return components, folder, record


def load_personalized(output_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                      allow_pickle: bool = False):
    """A ready diffusers pipeline for a trained result: a finished output folder or a checkpoint folder.

    Every module is in eval mode, so the same seed gives the same image. ``allow_pickle``: also load pickle
    (``.bin``/``.ckpt``) weights; only for results you trust, since unpickling can run arbitrary code."""
    components, folder, record = load_personalized_components(output_dir, dtype, allow_pickle)
    pipe = components.pipeline()
    method = METHODS.get(record["method"])
    if method is None:
        raise ModelLoadError(f"{folder / RECORD_NAME} names method {record['method']!r}, unknown to this version "
                             f"(known: {sorted(METHODS)}); upgrade t2i-personal.")
    try:
        pipe = method.load_into(pipe, folder, record)
    except (ModelLoadError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 -- a truncated file, a LoRA for another base model, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(
            f"{folder}: its {record['artifact']['type']} weights ({', '.join(artifact_files(record))}) could not be "
            f"applied to the base model {record.get('base_model', {}).get('pretrained')!r} ({type(exc).__name__}: "
            f"{first[:300]}). The files are damaged or were trained on another base model; copy them again or "
            "retrain.") from exc
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # adapters a loader injects start in training mode (LoRA dropout would vary per call)
    # what FreeCure reads: the concepts, the base model, the artifact type, the base's own parameterisation
    pipe._t2i_personal_record = {**record, "base_prediction_type": components.extras.get("base_prediction_type")}
    if device is not None:
        pipe.to(device)
    return pipe


def personalization_record(pipe) -> dict | None:
    """The record :func:`load_personalized` attached to ``pipe`` (concepts, base model, config, ...); ``None`` for a
    pipeline it did not load."""
    return getattr(pipe, "_t2i_personal_record", None)


def default_guidance(pipe) -> float:
    """The guidance a result is shown at when none is asked for: the embedded guidance it trained with (FLUX.1-dev),
    else its family's usual CFG scale (SD/SDXL 7.5, SD3 7.0, FLUX 3.5)."""
    from ..families import family_of_pipeline

    record = personalization_record(pipe) or {}
    if record.get("resolved", {}).get("guidance_scale"):
        return record["resolved"]["guidance_scale"]
    try:
        return family_of_pipeline(pipe).default_guidance_scale
    except ModelLoadError:  # a pipeline-like object of no family: the base default
        from ..families.base import ModelFamily

        return ModelFamily.default_guidance_scale
