"""Prompt templates (``{V}`` identifier, ``{C}`` class noun) and per-image caption files."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from ..errors import ConfigError

__all__ = [
    "PLACEHOLDERS",
    "caption_path_for",
    "prompt_for_image",
    "read_caption",
    "render_prompt",
]

PathLike = Union[str, "os.PathLike[str]"]

PLACEHOLDERS: dict[str, str] = {"V": "identifier", "C": "class noun"}

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def _valid_placeholders(numbered=()) -> str:
    return ", ".join([f"{{{k}}} ({v})" for k, v in PLACEHOLDERS.items()] + [f"{{{k}}}" for k in numbered])


def unmatched_brace(template: str) -> int | None:
    """Where the first ``{`` or ``}`` outside a whole ``{...}`` is (an unclosed ``{C``, a stray ``}``), or ``None``.

    Braces mean nothing but placeholders in a prompt, so a lone one is a typo that would otherwise reach the model.
    """
    blanked = _PLACEHOLDER_RE.sub(lambda m: " " * len(m.group(0)), template)
    return next((i for i, c in enumerate(blanked) if c in "{}"), None)


def render_prompt(template: str, identifier: str, class_noun: str, others: dict[str, str] | None = None) -> str:
    """Fill ``{V}``/``{C}`` (and any ``others``, e.g. ``{V2}``) in ``template`` and collapse whitespace.

    Raises ``ConfigError`` (a ``ValueError``) for any other ``{...}`` placeholder and for an unmatched brace.
    """
    values = {"V": identifier, "C": class_noun, **(others or {})}

    unknown = [m.group(0) for m in _PLACEHOLDER_RE.finditer(template) if m.group(1) not in values]
    if unknown:
        raise ConfigError(
            f"Prompt template {template!r} has unknown placeholder(s) "
            f"{', '.join(dict.fromkeys(unknown))}; valid placeholders are "
            f"{_valid_placeholders(list(others or {}))}."
        )
    at = unmatched_brace(template)
    if at is not None:
        raise ConfigError(
            f"Prompt template {template!r} has an unmatched {template[at]!r} at {template[at:at + 12]!r}; "
            f"write each placeholder whole ({_valid_placeholders(list(others or {}))}): braces mean nothing else "
            "in a prompt."
        )
    # One pass, so an identifier that itself contains "{C}" is not expanded again.
    rendered = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
    return " ".join(rendered.split())


def render_for_concepts(template: str, concepts) -> str:
    """A prompt naming several concepts: ``{V}``/``{C}`` are the first, ``{V1}``/``{C1}``, ``{V2}``/``{C2}``, ... each one."""
    others = {}
    for i, c in enumerate(concepts, start=1):
        others[f"V{i}"], others[f"C{i}"] = c.identifier, c.class_noun
    return render_prompt(template, concepts[0].identifier, concepts[0].class_noun, others)


def caption_path_for(image_path: PathLike) -> Path:
    """The caption file for an image: same folder and stem, ``.txt`` suffix."""
    return Path(image_path).with_suffix(".txt")


def read_caption(image_path: PathLike) -> str | None:
    """Caption next to ``image_path``: its first non-empty line, stripped; ``None`` if absent/empty.

    Raises ``ValueError`` naming the caption file if it is not valid UTF-8.
    """
    caption_file = caption_path_for(image_path)
    if not caption_file.is_file():
        return None
    data = caption_file.read_bytes()
    try:
        # utf-8-sig: editors on Windows often prepend a BOM that must not reach the prompt.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Caption file {caption_file} is not valid UTF-8 ({exc}); re-save it as UTF-8."
        ) from exc
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return None


def prompt_for_image(
    image_path: PathLike, template: str, identifier: str, class_noun: str
) -> str:
    """Prompt for one training image: its caption file (templated) if any, else ``template``."""
    caption = read_caption(image_path)
    if caption is None:
        return render_prompt(template, identifier, class_noun)
    try:
        return render_prompt(caption, identifier, class_noun)
    except ValueError as exc:
        raise ConfigError(f"In caption file {caption_path_for(image_path)}: {exc}") from exc
