"""``load_personalized``: the one way every CLI, the demo and the evaluator turn a trained result into a pipeline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..methods import METHODS
from ..models.components import Components
from ..models.loading import load_components
from ..training.checkpoint import FORMAT_VERSION, RECORD_NAME


def read_record(folder: str | Path) -> tuple[Path, dict]:
    folder = Path(folder)
    if (folder / RECORD_NAME).is_file():
        pass
    elif (folder / "inference" / RECORD_NAME).is_file():  # a checkpoint folder
        folder = folder / "inference"
    else:
        raise ModelLoadError(f"{folder} holds no {RECORD_NAME}: it is not a finished t2i-personal result (an unfinished "
                             "run has only checkpoints/; pass one of checkpoints/checkpoint-*/ instead).")
    record = json.loads((folder / RECORD_NAME).read_text())
    if record.get("format_version", 0) > FORMAT_VERSION:
        warnings.warn(f"{folder / RECORD_NAME} was written by a newer t2i-personal "
                      f"({record.get('t2i_personal_version')}); unknown fields are ignored.")
    return folder, record


def load_personalized_components(output_dir: str | Path, dtype: torch.dtype | None = None) -> tuple[Components, Path, dict]:
    """The base (or fully fine-tuned) components of a result, the folder holding its artifact, and its record."""
    folder, record = read_record(output_dir)
    artifact = record["artifact"]
    if artifact["type"] == "pipeline":
        components = load_components(ModelConfig(pretrained=str(folder / artifact["path"])), dtype=dtype)
    else:
        base = {k: v for k, v in record["base_model"].items() if k in ModelConfig.model_fields}
        components = load_components(ModelConfig(**base), dtype=dtype)
        override = record.get("config", {}).get("training", {}).get("prediction_type")
        if override:  # the adapter learned this parameterisation, whatever the base model's scheduler says
            components.extras["base_prediction_type"] = components.scheduler.config.prediction_type
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config,
                                                                          prediction_type=override)
    return components, folder, record


def load_personalized(output_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A ready diffusers pipeline for a trained result: a finished output folder or a checkpoint folder."""
    components, folder, record = load_personalized_components(output_dir, dtype)
    pipe = components.pipeline()
    method = METHODS.get(record["method"])
    if method is None:
        raise ModelLoadError(f"{folder / RECORD_NAME} names method {record['method']!r}, unknown to this version "
                             f"(known: {sorted(METHODS)}); upgrade t2i-personal.")
    pipe = method.load_into(pipe, folder, record)
    # what FreeCure reads: the concepts, the base model, the artifact type, the base's own parameterisation
    pipe._t2i_personal_record = {**record, "base_prediction_type": components.extras.get("base_prediction_type")}
    if device is not None:
        pipe.to(device)
    return pipe
