"""Where weights come from, and what is refused: pickle files unless the caller opts in, and a missing download
explained as an offline machine with the command that fixes it. Shared by base models, metric models and FreeCure.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_pickle(name: str | Path) -> bool:
    return str(name).lower().endswith(PICKLE_SUFFIXES)


def pickle_refusal(what: str, pickles: list[str], how_to_allow: str) -> ModelLoadError:
    return ModelLoadError(f"{what} holds only pickle weights ({', '.join(sorted(pickles))}), which can run arbitrary "
                          f"code when loaded. Convert them to safetensors, or {how_to_allow} if you trust these files.")


def check_weights_dir(path: Path, allow_pickle: bool, expected: str,
                      how_to_allow: str = "pass allow_pickle=True") -> None:
    """A model folder must hold safetensors weights; a pickle-only folder loads only when allowed."""
    files = [f.name for f in path.iterdir() if f.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if is_pickle(f)]
    if pickles and not allow_pickle:
        raise pickle_refusal(str(path), pickles, how_to_allow)
    if not pickles:
        raise ModelLoadError(f"{path} has no weights (expected {expected})")


def check_pipeline_dir(folder: Path, allow_pickle: bool, how_to_allow: str) -> None:
    """Every component folder of a diffusers pipeline that holds weights must hold safetensors ones."""
    if allow_pickle:
        return
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f.name for f in sub.iterdir() if f.is_file()]
        pickles = [f for f in files if is_pickle(f)]
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise pickle_refusal(str(sub), pickles, how_to_allow)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def offline_error(what: str, model_id: str, exc: Exception, how: str | None = None) -> ModelLoadError:
    """``what`` ("model", "metric model", ...) could not come from the hub; ``how`` defaults to the
    ``huggingface-cli download`` recipe for ``model_id``."""
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub could not be reached (this machine may be offline)"
    name = model_id.split("/")[-1]
    how = how or (f"On a machine with internet: `huggingface-cli download {model_id} --local-dir /path/to/{name}` "
                  f"(safetensors and config files are enough), copy the folder here and use /path/to/{name} instead.")
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return ModelLoadError(f"could not load {what} {model_id!r} from the Hugging Face hub: {why}, and it is not in the "
                          f"local cache.\n{how}\nUnderlying error: {type(exc).__name__}: {first_line}")
