"""Evaluation prompt sets: DreamBench's built-in prompts, ``.txt`` and ``.yaml`` prompt files, several concepts.

A prompt set is a list of templates in the project's usual notation (see :mod:`.captions`): ``{V}`` is a concept's
identifier and ``{C}`` its class noun, ``{V1}``/``{C1}``, ``{V2}``/``{C2}``, ... the first, second, ... concept of a
multi-concept prompt. :func:`load_prompt_set` renders them for the trained concepts::

    from t2i_personal.data.prompts import load_prompt_set
    prompts = load_prompt_set("dreambench-live", concepts=config.concepts)   # or record["concepts"]
    prompts[0].text          # 'a sks dog in the jungle'     (what the model is asked for)
    prompts[0].class_prompt  # 'a dog in the jungle'         (CLIP-T / BLIP2-T text: identifier removed)
    prompts[0].scene         # 'in the jungle'               (TI-CLIP text: concept mentions removed)

Which concepts a template is rendered for:

* a template that names only ``{V}``/``{C}`` is a single-concept prompt: it is rendered once for *each* concept
  (in file order, each template for every concept), so a single-concept set evaluates every concept of a
  multi-concept model;
* a template that names numbered placeholders (``{V1} {C1} and {V2} {C2} on the beach``) is rendered once, with
  ``{Vi}`` the i-th concept given (``{V}`` = ``{V1}``);
* a YAML entry's ``concepts: [sks, zwx]`` (identifiers) binds ``{V1}`` to ``sks``, ``{V2}`` to ``zwx``; a
  single-concept template with ``concepts: [zwx]`` is rendered for ``zwx`` only;
* a prompt without placeholders that spells an identifier out (``a sks dog on the beach``) mentions that concept,
  as if written with ``{V} {C}``.

Files: ``.txt`` holds one prompt per line (blank lines and lines starting with ``#`` are skipped); ``.yaml``/``.yml``
(or ``.json``) holds a list whose items are a prompt string or a mapping with ``prompt`` and optionally
``concepts`` (list of identifiers), ``scene`` (overrides the derived scene text) and ``category`` (a label to
group results by, e.g. DreamBench's ``recontextualization``/``accessorization``/``property``). A file over
:data:`MAX_PROMPT_FILE_BYTES`, a prompt over :data:`MAX_PROMPT_CHARS` characters and a brace outside a whole
placeholder (``{C on the beach``) are refused, naming the file and line (reading and checking the files is
:mod:`.prompt_files`'s part; this module renders them).

Built-in sets (files in ``prompt_sets/``): ``dreambench-objects`` and ``dreambench-live``, the 25 object and the 25
live-subject prompts of the DreamBooth dataset (Ruiz et al., 2023; ``google/dreambooth``), and ``dreambench``,
which gives each concept the live-subject prompts if its class noun is a living thing (:func:`is_live_class`) and
the object prompts otherwise. :func:`dreambench_subjects` is the dataset's subject -> class table.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Union

import yaml

from ..errors import ConfigError
from .captions import render_for_concepts
from .prompt_files import (  # the file limits are part of this module's API too
    BRACES_RE,
    FILE_SUFFIXES,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_FILE_BYTES,
    YAML_KEYS,
    PromptEntry,
    is_numbered,
    placeholder_indices,
    read_prompt_file,
    resolve_prompt_path,
)

__all__ = [
    "BUILTIN_PROMPT_SETS",
    "FILE_SUFFIXES",
    "LIVE_CLASSES",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_FILE_BYTES",
    "YAML_KEYS",
    "DreamBenchSubject",
    "Prompt",
    "dreambench_subjects",
    "is_live_class",
    "load_prompt_set",
]

PathLike = Union[str, "os.PathLike[str]"]

PROMPT_SETS_DIR = Path(__file__).resolve().parent / "prompt_sets"

BUILTIN_PROMPT_SETS: tuple[str, ...] = ("dreambench", "dreambench-live", "dreambench-objects")

#: Class nouns (last word, lower case) that get DreamBench's live-subject prompts under ``dreambench``: the
#: dataset's live classes (dog, cat) and other animals and people, which can wear a hat or an outfit.
LIVE_CLASSES: frozenset[str] = frozenset(
    {
        "dog", "puppy", "cat", "kitten", "person", "man", "woman", "boy", "girl", "child", "kid", "baby", "face",
        "horse", "pony", "bird", "parrot", "rabbit", "bunny", "hamster", "ferret", "fox", "wolf", "lion", "tiger",
        "monkey", "cow", "pig", "sheep", "goat", "chicken", "owl", "turtle", "tortoise", "lizard", "frog",
    }
)  # not "bear" or "duck": "teddy bear" and "rubber duck" are objects

_CONNECTORS = r"(?:and|&|,|with|next to|beside|besides|alongside|near)"
_STOP_WORDS = frozenset(
    {"of", "with", "in", "on", "at", "to", "for", "by", "from", "and", "next", "near", "beside", "under", "over"}
)


@dataclass(frozen=True)
class Prompt:
    """One rendered evaluation prompt.

    ``template``: the prompt with placeholders (a spelled-out identifier is shown as ``{Vi} {Ci}``);
    ``text``: what the model is asked for (``a sks dog in the jungle``);
    ``class_prompt``: ``text`` with each identifier replaced by its class noun (``a dog in the jungle``), the
    text CLIP-T / BLIP2-T compare images with;
    ``scene``: the prompt with the concept mentions removed (``in the jungle``), ``None`` if nothing is left;
    ``concepts``: identifiers of the concepts it shows, ``concept_indices``: their positions in the concepts
    given to :func:`load_prompt_set`;
    ``category``: the entry's label (DreamBench: ``recontextualization``, ``accessorization``, ``property``);
    ``source``: ``file:line`` it came from.
    """

    template: str
    text: str
    class_prompt: str
    scene: str | None
    concepts: tuple[str, ...]
    concept_indices: tuple[int, ...]
    category: str | None = None
    source: str = ""


@dataclass(frozen=True)
class DreamBenchSubject:
    """A subject of the DreamBooth dataset: its folder name (``dataset/<name>/``), class noun, live or object."""

    name: str
    class_noun: str
    live: bool


class _Concept(NamedTuple):
    identifier: str
    class_noun: str


# --------------------------------------------------------------------------------------------------- public API


def is_live_class(class_noun: str) -> bool:
    """Whether ``class_noun`` (its last word, e.g. ``corgi dog`` -> ``dog``) names a living thing (:data:`LIVE_CLASSES`)."""
    words = class_noun.lower().split()
    return bool(words) and words[-1] in LIVE_CLASSES


@lru_cache(maxsize=1)
def _subjects() -> tuple[DreamBenchSubject, ...]:
    path = PROMPT_SETS_DIR / "dreambench-subjects.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return tuple(DreamBenchSubject(name, str(v["class_noun"]), bool(v["live"])) for name, v in data.items())


def dreambench_subjects() -> dict[str, DreamBenchSubject]:
    """DreamBench's 30 subjects (9 live, 21 objects), by folder name, in the dataset's order."""
    return {s.name: s for s in _subjects()}


def load_prompt_set(name_or_path: PathLike, concepts: Any) -> list[Prompt]:
    """The prompts of a built-in set (:data:`BUILTIN_PROMPT_SETS`) or a ``.txt``/``.yaml`` file, rendered for ``concepts``.

    ``concepts``: one concept or a list of them, each an object with ``.identifier`` and ``.class_noun`` (e.g.
    :class:`t2i_personal.config.ConceptConfig`) or a mapping with those keys (``personalization.json``'s
    ``concepts``). Raises :class:`ConfigError` naming the set, file and line for every problem.
    """
    concept_list = _normalize_concepts(concepts)
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_PROMPT_SETS:
        if name_or_path == "dreambench":
            prompts: list[Prompt] = []
            for index, concept in enumerate(concept_list):
                name = "dreambench-live" if is_live_class(concept.class_noun) else "dreambench-objects"
                entries = read_prompt_file(PROMPT_SETS_DIR / f"{name}.yaml", shown=f"{name}.yaml")
                prompts += _render_entries(entries, concept_list, only=index)
            return prompts
        path, shown = PROMPT_SETS_DIR / f"{name_or_path}.yaml", f"{name_or_path}.yaml"
    else:
        path = resolve_prompt_path(name_or_path, BUILTIN_PROMPT_SETS)
        shown = str(path)
    return _render_entries(read_prompt_file(path, shown), concept_list)


# ------------------------------------------------------------------------------------------------------ rendering


def _normalize_concepts(concepts: Any) -> list[_Concept]:
    if concepts is None:
        raise ConfigError("load_prompt_set needs the concepts to render the prompts for (identifier and class noun).")
    if isinstance(concepts, Mapping) or hasattr(concepts, "identifier"):
        concepts = [concepts]
    if not isinstance(concepts, Sequence) or isinstance(concepts, str):
        raise ConfigError(f"concepts must be a concept or a list of concepts, not {concepts!r}.")
    if not concepts:
        raise ConfigError("concepts is empty: give at least one concept (identifier and class noun).")
    result = []
    for i, c in enumerate(concepts):
        if isinstance(c, Mapping):
            identifier, class_noun = c.get("identifier"), c.get("class_noun")
        else:
            identifier, class_noun = getattr(c, "identifier", None), getattr(c, "class_noun", None)
        if not isinstance(identifier, str) or not isinstance(class_noun, str) or not class_noun.strip():
            raise ConfigError(f"concept {i} ({c!r}) needs a string 'identifier' and a non-empty 'class_noun'.")
        result.append(_Concept(identifier.strip(), class_noun.strip()))
    return result


def _render_entries(entries: list[PromptEntry], concepts: list[_Concept], only: int | None = None) -> list[Prompt]:
    """Each entry for the concepts it applies to (``only``: the single-concept entries for that concept alone)."""
    by_identifier = {c.identifier: i for i, c in enumerate(concepts)}
    prompts = []
    for entry in entries:
        if entry.concepts is not None:
            missing = [c for c in entry.concepts if c not in by_identifier]
            if missing:
                raise ConfigError(
                    f"{entry.source}: prompt {entry.template!r} names concept(s) {', '.join(map(repr, missing))}, "
                    f"but the concepts are {', '.join(repr(c.identifier) for c in concepts)}."
                )
            bindings = [[by_identifier[c] for c in entry.concepts]]
        elif only is not None:
            bindings = [[only]]
        elif BRACES_RE.search(entry.template) is None:
            bindings = [list(range(len(concepts)))]  # literal: spelled-out identifiers of any concept
        elif is_numbered(entry.template):
            bindings = [list(range(len(concepts)))]
        else:
            bindings = [[i] for i in range(len(concepts))]
        for binding in bindings:
            prompts.append(_render(entry, binding, concepts))
    return prompts


def _render(entry: PromptEntry, binding: list[int], concepts: list[_Concept]) -> Prompt:
    bound = [concepts[i] for i in binding]
    template = entry.template
    literal = BRACES_RE.search(template) is None
    if literal:
        template, found = _placeholders_for_identifiers(template, bound)
        mentioned = found if entry.concepts is None else list(range(1, len(bound) + 1))
    else:
        numbers = placeholder_indices(template)
        too_high = sorted({n for n in numbers if n > len(bound)})
        if too_high:
            names = ", ".join(repr(c.identifier) for c in bound)
            raise ConfigError(
                f"{entry.source}: prompt {entry.template!r} names concept {too_high[0]} ({{V{too_high[0]}}}/"
                f"{{C{too_high[0]}}}), but only {len(bound)} concept(s) are given ({names})."
            )
        mentioned = sorted(set(numbers)) if entry.concepts is None else list(range(1, len(bound) + 1))
    text = render_for_concepts(template, bound)
    class_prompt = render_for_concepts(_class_template(template, bound), bound)
    scene = entry.scene if entry.scene_given else _scene(template)
    return Prompt(
        template=template,
        text=text,
        class_prompt=class_prompt,
        scene=scene,
        concepts=tuple(bound[n - 1].identifier for n in mentioned),
        concept_indices=tuple(binding[n - 1] for n in mentioned),
        category=entry.category,
        source=entry.source,
    )


def _token_re(word: str) -> str:
    return r"(?<![\w<>])" + re.escape(word) + r"(?![\w<>])"


def _placeholders_for_identifiers(text: str, bound: list[_Concept]) -> tuple[str, list[int]]:
    """A literal prompt with each spelled-out identifier (and its class noun after it) as ``{Vi} {Ci}``."""
    found = []
    for n, concept in enumerate(bound, start=1):
        if not concept.identifier:
            continue
        pair = re.compile(_token_re(concept.identifier) + r"\s+" + _token_re(concept.class_noun))
        alone = re.compile(_token_re(concept.identifier))
        if alone.search(text):
            found.append(n)
            text = pair.sub(f"{{V{n}}} {{C{n}}}", text)
            text = alone.sub(f"{{V{n}}}", text)
    return text, found


def _class_template(template: str, bound: list[_Concept]) -> str:
    """``{Vi} {Ci}`` -> ``{Ci}``, a lone ``{Vi}`` -> ``{Ci}``, with ``a``/``an`` fitted to the class noun."""
    numbered = re.sub(r"\{([VC])\}", r"{\g<1>1}", template)
    numbered = re.sub(r"\{V(\d+)\}\s*\{C\1\}", r"{C\1}", numbered)
    numbered = re.sub(r"\{V(\d+)\}", r"{C\1}", numbered)

    def article(m: re.Match) -> str:
        noun = bound[int(m.group(3)) - 1].class_noun
        an = noun[:1].lower() in "aeiou"
        return f"{m.group(1)}{'n' if an else ''} {{C{m.group(3)}}}"

    return re.sub(r"\b([Aa])(n?)\s+\{C(\d+)\}", article, numbered)


def _scene(template: str) -> str | None:
    """The template without its concept mentions: ``a {V} {C} in the jungle`` -> ``in the jungle``.

    Removes each placeholder run with the article in front of it (``a red {V} {C}`` -> ``red``), connectors between
    two mentions (``{V1} {C1} and {V2} {C2} on the beach`` -> ``on the beach``), a preposition in front of a
    mention (``a {V1} {C1} playing with a {V2} {C2} in the snow`` -> ``playing in the snow``) and dangling words at
    either end (``a photo of {V} {C}`` -> ``a photo``). ``None`` when nothing is left. A YAML entry's ``scene`` overrides it.
    """
    mark = "\x00"
    s = re.sub(r"(?:\{[VC]\d*\}\s*)+", f" {mark} ", template)
    s = " ".join(s.split())
    s = re.sub(rf"{mark}(?:\s*{_CONNECTORS}\s*(?:(?:a|an|the)\s+)?{mark})+", mark, s, flags=re.IGNORECASE)

    def drop_article(m: re.Match) -> str:
        between = m.group(2).split()
        if any(w.lower() in _STOP_WORDS for w in between):
            return m.group(0)
        return f"{m.group(2)}{mark}"

    s = re.sub(rf"\b(a|an|the)\s+((?:[\w-]+\s+){{0,2}}?){mark}", drop_article, s, flags=re.IGNORECASE)
    s = re.sub(rf"(?:\s*(?:,|&|\band|\bwith|\bof|\bnext to|\bbeside|\bnear))+\s*{mark}", f" {mark}", s, flags=re.IGNORECASE)
    s = re.sub(rf"{mark}\s*'s\b", mark, s)
    s = " ".join(s.replace(mark, " ").split())
    dangling_end = r"(?:\s*(?:,|&|\band|\bof|\bwith|\bnext to|\bbeside|\bnear|\ba|\ban|\bthe))+$"
    dangling_start = r"^(?:(?:,|&|and)\s*)+"
    s = re.sub(dangling_end, "", s, flags=re.IGNORECASE)
    s = re.sub(dangling_start, "", s, flags=re.IGNORECASE).strip(" ,")
    return s or None
