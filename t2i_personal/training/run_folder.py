"""The output folder of a training run: which folders a run may write into, and the leftovers it cleans.

A run writes only into a folder that is missing, empty, or its own unfinished run. "Its own" is recognised by
the marker file ``.t2i-personal-run.json`` written before anything else (runs from before the marker existed
are recognised by a complete checkpoint). Everything else (a user's folder holding their own ``config.yaml``,
the current directory, a file) is refused before anything is written, so a mistyped ``training.output_dir``
can never overwrite someone's files. While a run trains, it holds an exclusive lock on its marker, so a second
run started on the same folder is refused instead of interleaving checkpoints.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..atomic import write_json_atomic
from ..record import RECORD_NAME
from .checkpoint import list_checkpoints

MARKER_NAME = ".t2i-personal-run.json"
# Temporary names of folders being written (a checkpoint, the final export); a killed run leaves them behind.
TEMPORARY_PATTERNS = ("checkpoints/.tmp-checkpoint-*", ".final-*")


def check_output_dir(output_dir: str | Path, resume: str | None) -> Path:
    """Refuse an output folder a run may not write into; return it as a path. Writes nothing."""
    if not str(output_dir).strip():
        raise ConfigError("training.output_dir is empty, which would write into the current directory: name a "
                          "folder for the results, e.g. training.output_dir=outputs/my-dog")
    folder = Path(output_dir).expanduser()
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == folder else f"lies under {parent}, which is a file"
            raise ConfigError(f"training.output_dir {folder} {where}: choose a folder path, e.g. {folder}-run")
        if parent.exists():
            break
    _check_writable(folder)
    if not folder.exists() or not any(folder.iterdir()):
        return folder
    if (folder / RECORD_NAME).exists():
        raise ConfigError(finished_run_message(folder))
    if not is_our_run(folder):
        shown = ", ".join(sorted(p.name for p in folder.iterdir())[:5])
        raise ConfigError(
            f"training.output_dir {folder} already holds files that are not a t2i-personal run ({shown}, ...). A run "
            "only writes into a missing or empty folder, or continues its own unfinished run, so that nothing of "
            f"yours is overwritten: choose a new folder, e.g. training.output_dir={folder / 'run'}")
    found = list_checkpoints(folder)
    if found and resume is None:
        raise ConfigError(
            f"training.output_dir {folder} holds an unfinished run with checkpoints up to {found[-1].name}: continue it "
            f"with training.resume=latest, or choose a new training.output_dir to start over (a fresh start here "
            "would mix its checkpoints with the old ones)")
    return folder


def finished_run_message(folder: Path) -> str:
    found = list_checkpoints(folder)
    how = (f"to train on from one of its checkpoints, also set training.resume to it, e.g. "
           f"training.resume={found[-1]}" if found else "it keeps no checkpoint to train on from")
    return (f"training.output_dir {folder} already holds a finished run ({RECORD_NAME} exists) and is never "
            f"overwritten. Choose a new training.output_dir; {how}.")


def is_our_run(folder: Path) -> bool:
    return (folder / MARKER_NAME).is_file() or bool(list_checkpoints(folder))


def _check_writable(folder: Path) -> None:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:  # as root, permission bits say nothing: create (and remove) a folder where the run's first one will go
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".t2i-personal-write-test-"))
    except OSError as exc:
        raise ConfigError(f"training.output_dir {folder} cannot be written ({existing}: {exc.strerror or exc}): choose "
                          "a folder you can write to") from None


def claim(folder: Path):
    """Create ``folder``, mark it as this toolkit's run and lock it for this process; returns the lock handle
    (``release`` it when the run ends). A second process training into the same folder is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER_NAME
    if not marker.is_file():
        write_json_atomic(marker, {"t2i_personal_version": __version__,
                                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    handle = open(marker, "r+")  # noqa: SIM115 -- held for the whole run
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the folder checks above still apply
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"another training is running in {folder} (its {MARKER_NAME} is locked): wait for it to "
                          "finish or stop it, or choose a new training.output_dir") from None
    return handle


def release(handle) -> None:
    if handle is not None:
        handle.close()  # closing drops the lock


def remove_leftovers(folder: Path, keep: Path | None = None) -> list[Path]:
    """Remove the temporary folders of interrupted writes (a checkpoint being saved when the run was killed: on a
    real model each is gigabytes); ``keep`` is one being written right now."""
    removed = []
    for pattern in TEMPORARY_PATTERNS:
        for path in folder.glob(pattern):
            if path.is_dir() and path != keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


PROGRESS_LOG = "logs/progress.jsonl"  # one JSON line per step and per validation grid, for live views


def progress_log_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / PROGRESS_LOG
