"""``load_personalized``: the one way every CLI, the demo and the evaluator turn a trained result into a pipeline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError, ModelLoadError
from ..methods import METHODS
from ..models.components import Components
from ..models.loading import PICKLE_SUFFIXES, load_components
from ..training.checkpoint import FORMAT_VERSION, RECORD_NAME


def read_record(folder: str | Path) -> tuple[Path, dict]:
    """The folder holding a result's ``personalization.json`` and the record, checked: a record is data from
    elsewhere (a downloaded result), so malformed JSON, missing keys and artifact paths leaving the folder are
    refused with the file named."""
    folder = Path(folder)
    if (folder / RECORD_NAME).is_file():
        pass
    elif (folder / "inference" / RECORD_NAME).is_file():  # a checkpoint folder
        folder = folder / "inference"
    else:
        raise ModelLoadError(f"{folder} holds no {RECORD_NAME}: it is not a finished t2i-personal result (an unfinished "
                             "run has only checkpoints/; pass one of checkpoints/checkpoint-*/ instead).")
    path = folder / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON ({exc}): the result is damaged; copy it again from "
                             "where it was trained, or retrain.") from None
    _check_record(record, path)
    if record.get("format_version", 0) > FORMAT_VERSION:
        warnings.warn(f"{path} was written by a newer t2i-personal "
                      f"({record.get('t2i_personal_version')}); unknown fields are ignored.")
    for name in artifact_files(record):
        _inside(folder, name, path)
    return folder, record


def _check_record(record, path: Path) -> None:
    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is not a valid t2i-personal record: {what}. The result is damaged or was not "
                              "written by t2i-personal; copy it again from where it was trained, or retrain.")

    if not isinstance(record, dict):
        raise bad("it is not a JSON object")
    artifact = record.get("artifact")
    if not isinstance(artifact, dict) or not isinstance(artifact.get("type"), str):
        raise bad("it has no 'artifact' with a 'type'")
    if artifact["type"] not in ("tokens", "custom_diffusion") and not isinstance(artifact.get("path"), str):
        raise bad(f"its {artifact['type']!r} artifact has no 'path'")
    if not isinstance(record.get("method"), str):
        raise bad("it names no 'method'")
    base = record.get("base_model")
    if artifact["type"] != "pipeline" and not (isinstance(base, dict) and isinstance(base.get("pretrained"), str)):
        raise bad("it names no 'base_model' with 'pretrained'")
    if not isinstance(record.get("concepts", []), list) or not isinstance(artifact.get("tokens", []), list):
        raise bad("its 'concepts' or 'artifact.tokens' is not a list")


def artifact_files(record: dict) -> list[str]:
    """Every file (or, for a saved pipeline, folder) of the result that the record points to."""
    artifact = record["artifact"]
    names = [artifact[k] for k in ("path", "kohya_path", "single_file") if isinstance(artifact.get(k), str)]
    return names + [t["path"] if isinstance(t, dict) else t for t in artifact.get("tokens", [])]


def _inside(folder: Path, name, record_path: Path) -> Path:
    target = (folder / str(name)).resolve()
    if not isinstance(name, str) or not target.is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{record_path} points to {name!r}, outside the result folder {folder}: a result only "
                             "loads files of its own folder. The record was changed or is not a t2i-personal result.")
    return target


def _refuse_pickles(folder: Path, record: dict, allow_pickle: bool) -> None:
    pickles = [n for n in artifact_files(record) if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{folder / RECORD_NAME} points to pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
            "loaded. Convert them to .safetensors, or, if you trust where this result came from, load it with "
            "load_personalized(..., allow_pickle=True) (--allow-pickle on the command lines).")


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
    _refuse_pickles(folder, record, allow_pickle)
    artifact = record["artifact"]
    if artifact["type"] == "pipeline":
        components = load_components(ModelConfig(pretrained=str(folder / artifact["path"]), allow_pickle=allow_pickle),
                                     dtype=dtype)
    else:
        components = load_components(base_model_config(record, allow_pickle), dtype=dtype)
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
