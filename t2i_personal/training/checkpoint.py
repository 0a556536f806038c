"""Checkpoint folders: naming, listing, resume checks and pruning.

A checkpoint is ``checkpoints/checkpoint-NNNNNN/`` holding accelerate's optimizer/scheduler state, the
trainable tensors (``trainable.safetensors``), ``trainer_state.json`` and a ready-to-use ``inference/``
artifact. It is written under a temporary name and renamed, so a folder with the final name is always complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


# Keys that may change between a stop and a resume: they do not change what is computed, except
# max_train_steps, the knob for training on (a non-constant LR schedule then stretches to the new length).
RESUME_FREE_KEYS = {"training.output_dir", "training.resume", "training.stop_after_step", "training.max_train_steps",
                    "training.gradient_checkpointing", "training.attention", "training.allow_tf32",
                    "data.class_generation_batch_size", "training.checkpointing_steps",
                    "training.checkpoints_total_limit", "training.report_to", "training.progress_bar",
                    "data.num_workers"}
RESUME_FREE_SECTIONS = ("validation.", "export.")


def check_resume_config(checkpoint: Path, config, num_processes: int) -> None:
    """A resume must continue the same computation: refuse settings that differ from the checkpoint's."""
    state = read_checkpoint_state(checkpoint)
    saved = state.get("config")
    if state.get("num_processes", num_processes) != num_processes:
        raise ConfigError(f"training.resume = {checkpoint} was trained on {state['num_processes']} processes, this run has "
                          f"{num_processes}: the data stream and LR schedule depend on it. Launch with "
                          f"--num_processes {state['num_processes']}.")
    if state["global_step"] > config.training.max_train_steps:
        raise ConfigError(f"training.resume = {checkpoint} is at step {state['global_step']}, beyond training.max_train_steps "
                          f"({config.training.max_train_steps}); raise max_train_steps or pick an earlier checkpoint")
    if saved is None:
        return
    saved = with_new_defaults(saved, type(config))  # keys added since read as their defaults: older checkpoints resume
    flat_old, flat_new = flatten(saved), flatten(config.model_dump(mode="json"))
    changed = sorted(k for k in set(flat_old) | set(flat_new)
                     if flat_old.get(k) != flat_new.get(k) and k not in RESUME_FREE_KEYS
                     and not k.startswith(RESUME_FREE_SECTIONS))
    if changed:
        details = "; ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in changed[:8])
        raise ConfigError(f"training.resume = {checkpoint} was trained with different settings ({details}). Resume with "
                          "the same config (only output, checkpointing, logging, validation and export keys may change), "
                          "or start a new run.")


def with_new_defaults(saved: dict, model_cls) -> dict:
    """``saved`` (a dumped config) as this version dumps it: keys added since filled with their defaults, keys of
    other methods that older versions wrote at their defaults dropped. Unchanged when it no longer validates (the
    comparison then names what differs)."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_label(path: Path) -> str | None:
    """``<run>-checkpoint-NNNNNN`` for a checkpoint folder or its result folder; None for anything else."""
    from ..record import CHECKPOINT_RESULT

    path = path.resolve()
    checkpoint = path.parent if path.name == CHECKPOINT_RESULT else path
    if not checkpoint.name.startswith(CHECKPOINT_PREFIX):
        return None
    return f"{checkpoint.parent.parent.name}-{checkpoint.name}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:  # as diffusers does, start fresh, but say so: a typo in output_dir would look the same
            logger.warning("training.resume=latest: %s holds no complete checkpoint; starting from step 0",
                           output_dir / "checkpoints")
            return None
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"training.resume = {resume!r} is not a complete checkpoint folder (no trainer_state.json); "
                          f"use 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)] or '(none here)'}")
    return path


def read_checkpoint_state(checkpoint: Path) -> dict:
    """A checkpoint's ``trainer_state.json``; a damaged one raises the error naming an earlier checkpoint."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            raise ValueError("no integer global_step")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise damaged_checkpoint(checkpoint, exc) from None
    return state


def check_checkpoint_readable(checkpoint: Path) -> None:
    """Before any expensive work: the state and the trainable tensors' header read (a truncated file does not)."""
    from safetensors import safe_open

    read_checkpoint_state(checkpoint)
    try:
        with safe_open(str(checkpoint / "trainable.safetensors"), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 -- SafetensorError, OSError: any damage reads the same to the user
        raise damaged_checkpoint(checkpoint, exc) from None


def damaged_checkpoint(checkpoint: Path, exc: BaseException) -> ConfigError:
    """The error for a checkpoint that cannot be read: which one, why, and the earlier ones to resume from."""
    earlier = [str(p) for p in list_checkpoints(checkpoint.parent.parent) if p.name < checkpoint.name]
    way_out = (f"resume from an earlier one explicitly, e.g. training.resume={earlier[-1]}" if earlier else
               "no earlier checkpoint is left: start a new run in a new training.output_dir")
    return ConfigError(f"checkpoint {checkpoint} is damaged and cannot be resumed ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}): {way_out}, or delete it.")


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
