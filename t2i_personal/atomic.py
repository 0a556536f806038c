"""Writes that never leave a half-written file or folder under its final name.

Everything goes to a temp name in the destination's folder (a leading dot, so image listings skip it) and is
renamed with ``os.replace``, which is atomic on one file system.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """A temp path next to ``path`` for writers that need a file name (safetensors' ``save_file``,
    ``torch.save``); on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """Open a temp file next to ``path`` (``mode`` ``"w"`` text or ``"wb"``); on success it replaces ``path``."""
    with atomic_path(path) as tmp:
        # os.open with 0o666 honours the umask, unlike tempfile's 0o600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2))


@contextmanager
def atomic_dir(final: str | Path):
    """A temp folder next to ``final`` to fill; on success it replaces ``final`` (removed on failure)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> None:
    """Give a fully written folder its final name (replacing what had it)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def move_contents(src: Path, dst: Path) -> None:
    """Move every entry of ``src`` into ``dst`` (replacing), then remove ``src``."""
    for entry in src.iterdir():
        target = dst / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)
    src.rmdir()
