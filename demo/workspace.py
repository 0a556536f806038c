"""The app's work folder: where uploads are checked and stored, and which trained results it may load.

Everything the app writes lies in this folder; an uploaded file's name is never used as a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from t2i_personal.atomic import atomic_dir
from t2i_personal.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image_rgb, save_image_atomic
from t2i_personal.evaluation.layout import slugify
from t2i_personal.record import RECORD_NAME

from . import ROOT
from .errors import DemoError


def slug(text: str, fallback: str = "run") -> str:
    return slugify(text, limit=40, fallback=fallback)


def upload_path(file) -> Path:
    """Gradio hands uploads over as paths (or, in old versions, temp-file objects whose ``.name`` is the path)."""
    return Path(file) if isinstance(file, (str, Path)) else Path(file.name)


def unique_folder(parent: Path, name: str, taken=()) -> Path:
    """``parent/name``, or ``name-2``, ``name-3``, ... when that exists or is in ``taken``."""
    folder, n = parent / name, 1
    while folder.exists() or folder in taken:
        n += 1
        folder = parent / f"{name}-{n}"
    return folder


@dataclass
class Workspace:
    """The app's folder and its limits: ``uploads/``, ``runs/`` (trained results), ``evals/``, ``jobs/`` (configs
    and logs), ``class-images/`` (prior samples, reused by later runs with the same generation settings)."""

    root: Path
    max_uploads: int = 20
    max_upload_mb: float = 20.0
    min_uploads: int = 3

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        for sub in ("uploads", "runs", "evals", "jobs", "class-images"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def inside(self, path: Path) -> Path:
        """``path`` resolved, refused unless it lies in the work folder."""
        resolved = Path(path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise DemoError(f"{path} is outside the work folder {self.root}")
        return resolved

    def save_uploads(self, files: list, captions: list[str] | None = None, name: str = "images") -> Path:
        """Check the uploaded images (count, size, type, readability) and store them, as PNGs named
        ``image-NN.png``, in a new folder under ``uploads/``; a non-empty caption goes next to its image."""
        images = self._load_uploads([upload_path(f) for f in (files or [])])
        captions = list(captions or [])
        folder = unique_folder(self.root / "uploads", slug(name, "images"))
        with atomic_dir(folder) as tmp:  # a failed upload leaves no half-filled folder behind
            for i, image in enumerate(images):
                save_image_atomic(image, tmp / f"image-{i:02d}.png")
                caption = captions[i] if i < len(captions) else ""
                caption = caption if isinstance(caption, str) else ""  # an empty table cell can arrive as NaN
                if caption.strip():
                    (tmp / f"image-{i:02d}.txt").write_text(caption.strip() + "\n", encoding="utf-8")
        return folder

    def _load_uploads(self, paths: list[Path]) -> list:
        if len(paths) < self.min_uploads:
            raise DemoError(f"{len(paths)} image(s) uploaded: upload {self.min_uploads}-{self.max_uploads} images of the "
                            "subject or style")
        if len(paths) > self.max_uploads:
            raise DemoError(f"{len(paths)} files uploaded; at most {self.max_uploads} are accepted")
        images = []
        for path in paths:
            shown = path.name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DemoError(f"{shown}: not an image file (accepted: {', '.join(sorted(IMAGE_EXTENSIONS))})")
            size_mb = path.stat().st_size / 1e6
            if size_mb > self.max_upload_mb:
                raise DemoError(f"{shown}: {size_mb:.1f} MB, over the {self.max_upload_mb:g} MB limit per image")
            try:
                images.append(load_image_rgb(path))
            except ImageLoadError as exc:
                raise DemoError(f"{shown}: {exc}") from exc
        return images

    def check_result(self, result: str | None) -> str:
        """``result`` if it is one of :meth:`results` (the only folders the app loads models from)."""
        if not result:
            raise DemoError("pick a trained result (train one first, then Refresh)")
        if str(result) not in {str(p) for p in self.results()}:
            raise DemoError(f"{result} is not a finished result of this app or of outputs/")
        return str(result)

    def results(self) -> list[Path]:
        """Finished trained results: the app's own runs, then the CLI's ``outputs/`` folders."""
        found = []
        for parent in (self.root / "runs", ROOT / "outputs"):
            if parent.is_dir():
                found += sorted(p for p in parent.iterdir() if (p / RECORD_NAME).is_file())
        return found
