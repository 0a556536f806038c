"""Reading and validating prompt files: the ``.txt`` and ``.yaml``/``.yml``/``.json`` files behind a prompt set.

:func:`resolve_prompt_path` turns a name or path into an existing prompt file (or says which built-in set was
probably meant); :func:`read_prompt_file` reads it into :class:`PromptEntry` items, one per prompt, each with the
``file:line`` it came from, and refuses an oversized file, an overlong prompt and a malformed placeholder. The
entries are still templates: :mod:`.prompts` renders them for the trained concepts. The file format is described
there (:func:`t2i_personal.data.prompts.load_prompt_set`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import yaml

from ..errors import ConfigError
from .captions import unmatched_brace

__all__ = [
    "BRACES_RE",
    "FILE_SUFFIXES",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_FILE_BYTES",
    "YAML_KEYS",
    "PromptEntry",
    "is_numbered",
    "placeholder_indices",
    "read_prompt_file",
    "resolve_prompt_path",
]

PathLike = Union[str, "os.PathLike[str]"]

YAML_KEYS: tuple[str, ...] = ("prompt", "concepts", "scene", "category")

# A text encoder reads 77 CLIP tokens (a few hundred characters) or, for T5, 512 (about 2,000): a longer prompt can
# never reach the model whole, and every prompt is also written into the report. The file cap is checked before
# the file is read, so a runaway file costs no memory.
MAX_PROMPT_CHARS = 4_000
MAX_PROMPT_FILE_BYTES = 4_000_000
FILE_SUFFIXES: tuple[str, ...] = (".txt", ".yaml", ".yml", ".json")

#: A whole ``{...}`` in a template (group 1: what is between the braces).
BRACES_RE = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER_RE = re.compile(r"^([VC])([1-9][0-9]*)?$")

_VALID_PLACEHOLDERS = ("{V} (identifier), {C} (class noun), and {V1}/{C1}, {V2}/{C2}, ... for the first, second, "
                       "... concept")


@dataclass(frozen=True)
class PromptEntry:
    """One prompt of a file, before rendering: its template and what the entry says about it."""

    template: str
    concepts: tuple[str, ...] | None  # identifiers given by the entry, None if it gives none
    scene: str | None
    scene_given: bool
    category: str | None
    source: str


def resolve_prompt_path(name_or_path: PathLike, builtin_sets: Sequence[str]) -> Path:
    """The prompt file ``name_or_path`` names; a name that is neither a file nor one of ``builtin_sets`` is refused."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = (
        not isinstance(name_or_path, str)
        or path.suffix.lower() in FILE_SUFFIXES
        or os.sep in text
        or "/" in text
        or path.exists()
    )
    if not looks_like_path:
        close = difflib.get_close_matches(text, builtin_sets, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Unknown prompt set {text!r}.{hint} Built-in sets are {', '.join(builtin_sets)}; "
            f"or give a prompt file ({', '.join(FILE_SUFFIXES)})."
        )
    if not path.exists():
        raise ConfigError(f"Prompt file {path} does not exist (built-in sets: {', '.join(builtin_sets)}).")
    if not path.is_file():
        raise ConfigError(f"Prompt file {path} is not a file.")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError(
            f"Prompt file {path} has an unsupported suffix {path.suffix!r}: use .txt (one prompt per line) or "
            ".yaml (a list of prompts)."
        )
    return path


def read_prompt_file(path: Path, shown: str) -> list[PromptEntry]:
    """The checked entries of the prompt file ``path`` (``shown``: its name in messages and ``source``)."""
    try:
        size = path.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise ConfigError(
                f"Prompt file {shown} is {size:,} bytes; prompt files are limited to {MAX_PROMPT_FILE_BYTES:,} bytes "
                f"(prompts of at most {MAX_PROMPT_CHARS:,} characters each). Is it the right file? Split a real "
                "prompt set into several files."
            )
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Prompt file {shown} is not valid UTF-8 ({exc}); re-save it as UTF-8.") from exc
    except OSError as exc:
        raise ConfigError(f"Prompt file {shown} could not be read: {exc}") from exc
    if path.suffix.lower() == ".txt":
        entries = [
            PromptEntry(line.strip(), None, None, False, None, f"{shown}:{number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")
        ]
    else:
        entries = _read_yaml(text, shown)
    if not entries:
        raise ConfigError(f"Prompt file {shown} holds no prompts.")
    for entry in entries:
        _check_lengths(entry)
        _check_placeholders(entry)
    return entries


def _read_yaml(text: str, shown: str) -> list[PromptEntry]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Prompt file {shown} is not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(
            f"{shown}:{node.start_mark.line + 1}: a prompt file holds a list of prompts (strings, or mappings with "
            f"keys {', '.join(YAML_KEYS)}), not a {type(data).__name__}."
        )
    return [
        _yaml_entry(item, number, f"{shown}:{item_node.start_mark.line + 1}")
        for number, (item, item_node) in enumerate(zip(data, node.value), start=1)
    ]


def _yaml_entry(item: object, number: int, where: str) -> PromptEntry:
    """Prompt entry ``number`` of a YAML list (a string or a mapping with :data:`YAML_KEYS`), found at ``where``."""
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: prompt entry {number} must be a string or a mapping, not {item!r}.")
    for key in item:
        if key not in YAML_KEYS:
            close = difflib.get_close_matches(str(key), YAML_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r} in prompt entry {number}.{hint} Valid keys: {', '.join(YAML_KEYS)}."
            )
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: prompt entry {number} needs a non-empty 'prompt' string.")
    concepts = item.get("concepts")
    if isinstance(concepts, str):
        concepts = [concepts]
    if concepts is not None and (
        not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts)
    ):
        raise ConfigError(f"{where}: 'concepts' of prompt entry {number} must be a non-empty list of identifiers.")
    scene, category = item.get("scene"), item.get("category")
    for key, value in (("scene", scene), ("category", category)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {key!r} of prompt entry {number} must be a string, not {value!r}.")
    return PromptEntry(
        " ".join(prompt.split()),
        tuple(c.strip() for c in concepts) if concepts is not None else None,
        " ".join(scene.split()) or None if scene is not None else None,
        "scene" in item,
        category,
        where,
    )


def placeholder_indices(template: str) -> list[int]:
    """Concept numbers (1-based) a valid template names; ``{V}``/``{C}`` count as 1."""
    return [int(_PLACEHOLDER_RE.match(m.group(1)).group(2) or 1) for m in BRACES_RE.finditer(template)]


def is_numbered(template: str) -> bool:
    """Whether a valid template names a numbered placeholder (``{V1}``, ``{C2}``, ...)."""
    return any(_PLACEHOLDER_RE.match(m.group(1)).group(2) for m in BRACES_RE.finditer(template))


def _check_lengths(entry: PromptEntry) -> None:
    for what, text in (("prompt", entry.template), ("scene", entry.scene), ("category", entry.category)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise ConfigError(
                f"{entry.source}: the {what} is {len(text):,} characters long ({text[:40]!r}...); the limit is "
                f"{MAX_PROMPT_CHARS:,}, far more than a text encoder reads (77 CLIP tokens are a few hundred "
                "characters). Shorten it; in a .txt file, check that each line holds one prompt."
            )


def _check_placeholders(entry: PromptEntry) -> None:
    unknown = [m.group(0) for m in BRACES_RE.finditer(entry.template) if not _PLACEHOLDER_RE.match(m.group(1))]
    if unknown:
        raise ConfigError(
            f"{entry.source}: prompt {entry.template!r} has unknown placeholder(s) {', '.join(dict.fromkeys(unknown))}; "
            f"valid placeholders are {_VALID_PLACEHOLDERS}."
        )
    at = unmatched_brace(entry.template)
    if at is not None:
        raise ConfigError(
            f"{entry.source}: prompt {entry.template!r} has an unmatched {entry.template[at]!r} at "
            f"{entry.template[at:at + 12]!r}; write each placeholder whole ({_VALID_PLACEHOLDERS}): braces mean "
            "nothing else in a prompt."
        )
