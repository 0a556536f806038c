"""``personalization.json``: the record that makes a folder a finished result, written last by the trainer and read
by every loader (inference, evaluation, FreeCure, the demo).

Format version 1 (the only one so far): ``base_model`` (the ModelConfig, local paths absolute), ``family``,
``method``, ``adapter``, ``artifact`` (``type`` and the files it consists of), ``concepts``, ``steps``, ``seed``
the full ``config`` and ``resolved`` (what the model family's defaults resolved to: the training objective's
settings, the embedded guidance, T5's window).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from . import __version__
from .errors import ModelLoadError
from .weights import is_pickle

RECORD_NAME = "personalization.json"
CHECKPOINT_RESULT = "inference"  # a checkpoint's own result folder (its record inside)
FORMAT_VERSION = 1


def make_record(config, artifact: dict, family: str, step: int, resolved: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "t2i_personal_version": __version__,
        "base_model": _portable_model(config.model.model_dump(mode="json")),
        "family": family,
        "method": config.method.name,
        "adapter": getattr(config.method, "adapter", None),
        "artifact": artifact,
        "concepts": [{"identifier": c.identifier, "class_noun": c.class_noun, "instance_prompt": c.instance_prompt}
                     for c in config.concepts],
        "steps": step,
        "seed": config.training.seed,
        "config": config.model_dump(mode="json"),
        "resolved": resolved or {},  # what the family's defaults resolved to (objective, guidance, T5 window)
    }


def _portable_model(model: dict) -> dict:
    """Local model paths made absolute, so a result loads from any working directory."""
    for key in ("pretrained", "config_dir"):
        value = model.get(key)
        if value and not value.startswith("builtin:") and Path(value).expanduser().exists():
            model[key] = str(Path(value).expanduser().resolve())
    return model


def read_record(folder: str | Path) -> tuple[Path, dict]:
    """The folder holding a result's ``personalization.json`` and the record, checked: a record is data from
    elsewhere (a downloaded result), so malformed JSON, missing keys and artifact paths leaving the folder are
    refused with the file named."""
    folder = Path(folder)
    if (folder / RECORD_NAME).is_file():
        pass
    elif (folder / CHECKPOINT_RESULT / RECORD_NAME).is_file():  # a checkpoint folder
        folder = folder / CHECKPOINT_RESULT
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


def refuse_pickles(folder: Path, record: dict, allow_pickle: bool) -> None:
    pickles = [n for n in artifact_files(record) if is_pickle(n)]
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{folder / RECORD_NAME} points to pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
            "loaded. Convert them to .safetensors, or, if you trust where this result came from, load it with "
            "load_personalized(..., allow_pickle=True) (--allow-pickle on the command lines).")
