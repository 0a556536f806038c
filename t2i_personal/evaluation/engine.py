"""Evaluation engine: generate images of trained results over a prompt set, score them, summarise.

The pieces, usable on their own:

* :data:`METRICS` / :func:`register_metric`: the metric registry (name -> factory + which input it scores against);
* :func:`plan_jobs`: the (model, prompt, k) jobs, each with its seed and output path;
* :func:`generate`: renders missing images (existing files are kept, so an interrupted run resumes), split across
  ``accelerate`` processes;
* :func:`score`: one row per image with every metric;
* :func:`set_distances`: set-level FID / KID of each model's images against a reference folder (``--fid-reference``);
* :func:`evaluate`: all of the above plus ``results.csv``, ``summary.json`` and ``report.html``.

Layout of the output folder::

    OUT/<model-name>/<prompt-index:03d>-<slug>/<k>.png   generated images (k = 0 .. images_per_prompt-1)
    OUT/results.csv, OUT/summary.json, OUT/report.html, OUT/report/ (grids and charts)

Image ``k`` of prompt ``p`` uses seed ``seed + p * images_per_prompt + k``: deterministic, independent of the
process split and of which images already exist.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError

# ------------------------------------------------------------------------------------------------- metric registry

#: what a metric compares each image with
INPUT_CLASS_PROMPT = "class_prompt"  # the prompt with identifiers replaced by class nouns
INPUT_SCENE = "scene"  # the prompt with the concept mentions removed
INPUT_REFERENCES = "references"  # the concept's reference (training) images
INPUT_CONCEPTS = "concepts"  # the prompt's concepts, each with its class noun and reference images (CP-CLIP)
INPUTS = (INPUT_CLASS_PROMPT, INPUT_SCENE, INPUT_REFERENCES, INPUT_CONCEPTS)


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: ``factory(options)`` builds a :class:`t2i_personal.metrics.Metric`; ``input`` says
    what each image is scored against (:data:`INPUT_CLASS_PROMPT`, :data:`INPUT_SCENE`, :data:`INPUT_REFERENCES`
    or :data:`INPUT_CONCEPTS`).

    ``extra_columns``: per-image values besides the score, each the name of a per-image tensor attribute of the
    result of ``metric.evaluate(images, ...)``; recorded as ``<name>_<attribute>`` (e.g. ``cp_clip_detection_rate``)
    in ``results.csv`` and the summary."""

    name: str
    factory: Callable[[MetricOptions], Any]
    input: str
    description: str = ""
    extra_columns: tuple[str, ...] = ()

    def columns(self) -> list[str]:
        """The per-image columns this metric fills: its own name, then ``<name>_<extra>``."""
        return [self.name, *(f"{self.name}_{c}" for c in self.extra_columns)]


@dataclass
class MetricOptions:
    """What the factories need: metric model sources, device, batch size, progress bars."""

    clip_model: str = "builtin:toy-clip"
    clip_pretrained: str | None = None
    dino_model: str | None = None
    blip_model: str | None = None  # None: the variant's hub default
    blip_variant: str = "blip1-itc"
    #: CP-CLIP's open-vocabulary detector: a hub id / local folder of an OWL-ViT model, or a loaded detector
    #: (any callable ``detector(image, queries, threshold)``, see :mod:`t2i_personal.metrics.cp_clip`)
    detector: Any = "google/owlvit-base-patch32"
    detection_threshold: float = 0.1
    #: FID/KID's feature extractor (``--fid-feature``): "inception", "builtin:toy-clip", a DINO / open_clip folder
    fid_feature: str = "inception"
    fid_pretrained: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    progress: bool = True
    allow_pickle: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def clip(self):
        """The CLIP model, loaded once and shared by CLIP-T, CLIP-I and TI-CLIP."""
        from ..metrics import load_metric_model

        key = ("clip", self.clip_model, self.clip_pretrained)
        if key not in self._cache:
            self._cache[key] = load_metric_model(self.clip_model, pretrained=self.clip_pretrained,
                                                 library="open_clip", device=self.device,
                                                 allow_pickle=self.allow_pickle)
        return self._cache[key]

    def detector_model(self):
        """CP-CLIP's detector, loaded once (:func:`load_detector` for a source, else the given callable)."""
        if not isinstance(self.detector, (str, Path)):
            return self.detector
        key = ("detector", str(self.detector))
        if key not in self._cache:
            self._cache[key] = load_detector(str(self.detector), device=self.device, allow_pickle=self.allow_pickle)
        return self._cache[key]


def load_detector(source: str, device: str = "cpu", allow_pickle: bool = False):
    """The OWL-ViT detector of ``cp_clip`` from a hub id (local Hugging Face cache when offline) or a local folder;
    a :class:`~t2i_personal.errors.ModelLoadError` saying how to provide it otherwise. Tests replace this."""
    from ..metrics import OwlVitDetector

    return OwlVitDetector(source, device=device, allow_pickle=allow_pickle)


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, factory: Callable[[MetricOptions], Any], input: str, description: str = "",
                    extra_columns: Sequence[str] = ()) -> None:
    """Add (or replace) a metric of the evaluator: ``evaluate.py --metrics NAME`` then builds ``factory(options)``.

    ``input`` (what each image is scored against) and how the metric is called:

    * ``"class_prompt"`` / ``"scene"``: ``metric(images, texts)``;
    * ``"references"``: ``metric(images, references=files)``, once per (model, concept);
    * ``"concepts"``: ``metric.evaluate(images, concepts)`` (or ``metric(images, concepts)`` without ``evaluate``),
      once per (model, set of concepts a prompt shows), ``concepts`` being dicts with ``name`` (the identifier),
      ``class_noun`` and ``references`` (files).

    ``extra_columns``: see :class:`MetricSpec`.
    """
    if input not in INPUTS:
        raise ValueError(f"input must be one of {', '.join(repr(i) for i in INPUTS)}, not {input!r}")
    METRICS[name] = MetricSpec(name, factory, input, description, tuple(extra_columns))


def _clip_t(o: MetricOptions):
    from ..metrics import ClipTextScore
    return ClipTextScore(o.clip(), batch_size=o.batch_size, progress=o.progress)


def _clip_i(o: MetricOptions):
    from ..metrics import ClipImageScore
    return ClipImageScore(o.clip(), batch_size=o.batch_size, progress=o.progress)


def _ti_clip(o: MetricOptions):
    from ..metrics import TIClipScore
    return TIClipScore(o.clip(), batch_size=o.batch_size, progress=o.progress)


def _dino_i(o: MetricOptions):
    from ..metrics import DinoImageScore
    if not o.dino_model:
        raise ConfigError("dino_i needs a DINO model: pass --dino-model facebook/dino-vits16 (a hub id in the local "
                          "Hugging Face cache) or a local transformers folder")
    return DinoImageScore(o.dino_model, batch_size=o.batch_size, progress=o.progress, device=o.device,
                          allow_pickle=o.allow_pickle)


def _blip2_t(o: MetricOptions):
    from ..metrics import BlipTextScore
    return BlipTextScore(o.blip_model, variant=o.blip_variant, batch_size=o.batch_size, progress=o.progress,
                         device=o.device, allow_pickle=o.allow_pickle)


def _cp_clip(o: MetricOptions):
    from ..metrics import ClipImageScore, CPClipScore
    return CPClipScore(ClipImageScore(o.clip(), batch_size=o.batch_size, progress=o.progress),
                       detector=o.detector_model(), threshold=o.detection_threshold)


register_metric("clip_t", _clip_t, INPUT_CLASS_PROMPT, "CLIP-T: image vs prompt with the class noun")
register_metric("blip2_t", _blip2_t, INPUT_CLASS_PROMPT,
                "BLIP2-T: BLIP ITC cosine, image vs prompt with the class noun (ClassDiffusion's BLIP-1 by default)")
register_metric("clip_i", _clip_i, INPUT_REFERENCES, "CLIP-I: image vs the concept's reference images")
register_metric("ti_clip", _ti_clip, INPUT_SCENE, "TI-CLIP: image vs the prompt's scene text")
register_metric("dino_i", _dino_i, INPUT_REFERENCES, "DINO-I: image vs the concept's reference images (DINO ViT)")
register_metric("cp_clip", _cp_clip, INPUT_CONCEPTS,
                "CP-CLIP (Gen4Gen): OWL-ViT crops of the prompt's concepts vs their reference images (--clip-model); "
                "per-image detection rate in cp_clip_detection_rate", extra_columns=("detection_rate",))

DEFAULT_METRICS = ("clip_t", "clip_i", "ti_clip")


def parse_metric_names(names: str | Sequence[str] | None) -> list[str]:
    """``"clip_t,clip_i"`` or a list -> validated names; an unknown name raises ConfigError with the nearest one."""
    if names is None:
        return list(DEFAULT_METRICS)
    if isinstance(names, str):
        names = [n for n in re.split(r"[,\s]+", names) if n]
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if name not in METRICS:
            close = difflib.get_close_matches(name, METRICS, n=1, cutoff=0.4)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown metric {raw!r}.{hint} Known metrics: {', '.join(sorted(METRICS))}.")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"No metric given; known metrics: {', '.join(sorted(METRICS))}.")
    return out


def build_metrics(names: Sequence[str], options: MetricOptions) -> dict[str, Any]:
    return {name: METRICS[name].factory(options) for name in parse_metric_names(list(names))}


def metric_columns(names: Sequence[str]) -> list[str]:
    """The per-image columns of ``names``: each metric's score, then its extra columns (``cp_clip_detection_rate``)."""
    return [c for n in names for c in METRICS[n].columns()]


# ------------------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One thing being evaluated: a trained result (``model_dir``) or a folder of existing images (``images_dir``).

    ``concepts``: ``[{"identifier", "class_noun"}]``; ``references``: per concept, the reference image files.
    """

    name: str
    concepts: list[dict]
    references: list[list[Path]]
    model_dir: Path | None = None
    images_dir: Path | None = None
    resolution: int | None = None
    record: dict | None = None
    freecure: bool = False  # generate with FreeCure attribute repair (a second source of the same model)


def _instance_dirs(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _reference_files(dirs: Sequence[str], model_dir: Path | None) -> list[Path]:
    from ..data.images import list_image_files

    files: list[Path] = []
    for d in dirs:
        candidates = [Path(d).expanduser()]
        if model_dir is not None and not candidates[0].is_absolute():
            candidates += [model_dir / d, model_dir.parent / d]
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            raise ConfigError(f"reference image folder {d} (a concept's instance_dir"
                              f"{' in ' + str(model_dir) if model_dir else ''}) does not exist here; pass "
                              "--references DIR (once per concept) to point at the concept's images")
        files += list_image_files(folder)
    return files


def load_model_source(model_dir: str | Path, references: Sequence[str] | None = None,
                      need_references: bool = True) -> Source:
    """A trained result: its concepts and reference images from ``personalization.json`` (the reference folders
    are only looked up with ``need_references``)."""
    from ..errors import ModelLoadError
    from ..inference.pipeline import read_record

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model {model_dir}: no such folder (expected a training output_dir holding "
                          "personalization.json, or a checkpoints/checkpoint-*/ folder)")
    try:
        folder, record = read_record(path)
    except ModelLoadError as exc:
        raise ConfigError(f"--model {model_dir} is not a t2i-personal result: {exc}") from exc
    concepts = [{"identifier": c["identifier"], "class_noun": c["class_noun"]} for c in record.get("concepts", [])]
    if not concepts:
        raise ConfigError(f"{folder}/personalization.json lists no concepts")
    config = record.get("config", {})
    cfg_concepts = config.get("concepts", [])
    if not need_references:
        refs = [[] for _ in concepts]
    elif references:
        if len(references) != len(concepts):
            raise ConfigError(f"{len(references)} --references folders for {len(concepts)} concepts of {model_dir}")
        refs = [_reference_files([r], None) for r in references]
    else:
        refs = [_reference_files(_instance_dirs(c.get("instance_dir")), path.resolve()) if i < len(cfg_concepts)
                else [] for i, c in enumerate(cfg_concepts or concepts)]
    resolution = config.get("data", {}).get("resolution")
    name = path.resolve().name
    if name == "inference" or path.resolve().name.startswith("checkpoint-"):
        ck = folder.parent if folder.name == "inference" else folder
        name = f"{ck.parent.parent.name}-{ck.name}"
    return Source(name, concepts, refs, model_dir=path, resolution=resolution, record=record)


def load_images_source(images_dir: str | Path, concepts: Sequence[dict], references: Sequence[str] | None,
                       name: str | None = None) -> Source:
    """A folder of existing images laid out as ``DIR/<prompt-index>-<slug>/*.png`` (what :func:`generate` writes)."""
    path = Path(images_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--images {images_dir}: no such folder")
    refs = [_reference_files([r], None) for r in references] if references else [[] for _ in concepts]
    if references and len(references) != len(concepts):
        raise ConfigError(f"{len(references)} --references folders for {len(concepts)} concepts")
    return Source(name or path.resolve().name, list(concepts), refs, images_dir=path)


def parse_concept(text: str) -> dict:
    """``"sks:dog"`` or ``"sks:corgi dog"`` -> ``{"identifier": "sks", "class_noun": "dog"}``."""
    identifier, sep, noun = text.partition(":")
    if not sep or not identifier.strip() or not noun.strip():
        raise ConfigError(f"--concept {text!r}: expected IDENTIFIER:CLASS_NOUN, e.g. sks:dog")
    return {"identifier": identifier.strip(), "class_noun": noun.strip()}


# ---------------------------------------------------------------------------------------------------------- jobs


def slugify(text: str, limit: int = 48, fallback: str = "prompt") -> str:
    """A folder name from free text: lower-case letters, digits and dashes only (no path can come through)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or fallback


def prompt_dir_name(index: int, text: str) -> str:
    return f"{index:03d}-{slugify(text)}"


@dataclass(frozen=True)
class Job:
    source: int  # index into the sources
    prompt: int  # prompt index
    k: int  # image index within the prompt
    seed: int
    path: Path


def image_seed(seed: int, prompt_index: int, k: int, images_per_prompt: int) -> int:
    return seed + prompt_index * images_per_prompt + k


def plan_jobs(sources: Sequence[Source], prompts: Sequence[Sequence[Any]], out_dir: Path,
              images_per_prompt: int, seed: int) -> list[Job]:
    """Every (source, prompt, k) of generated sources; ``prompts[i]`` are source ``i``'s rendered prompts."""
    jobs = []
    for s, source in enumerate(sources):
        if source.model_dir is None:
            continue
        for p, prompt in enumerate(prompts[s]):
            folder = out_dir / source.name / prompt_dir_name(p, prompt.text)
            for k in range(images_per_prompt):
                jobs.append(Job(s, p, k, image_seed(seed, p, k, images_per_prompt), folder / f"{k}.png"))
    return jobs


# ---------------------------------------------------------------------------------------------------- generation


@dataclass
class GenerationOptions:
    steps: int = 30
    guidance: float = 7.5
    height: int | None = None  # default: the model's training resolution
    width: int | None = None
    device: str | None = None
    dtype: str = "float32"
    negative_prompt: str | None = None
    progress: bool = True
    freecure: dict = field(default_factory=dict)  # FreeCure(...) options for the "+freecure" sources
    allow_pickle: bool = False  # results (and FreeCure's models) may hold pickle weights: only if the user says so


FREECURE_SUFFIX = "+freecure"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def generate(sources: Sequence[Source], prompts: Sequence[Sequence[Any]], jobs: Sequence[Job],
             options: GenerationOptions, state=None) -> int:
    """Render this process's share of ``jobs`` whose file is missing; returns how many images were written.

    With an ``accelerate.PartialState`` of several processes, rank ``r`` takes jobs ``r, r + world, ...``.
    """
    from ..data.images import save_image_atomic
    from ..inference.pipeline import load_personalized

    if options.dtype not in _DTYPES:
        raise ConfigError(f"--dtype {options.dtype!r}: use one of {', '.join(_DTYPES)}")
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = [j for i, j in enumerate(jobs) if i % world == rank and not j.path.is_file()]
    device = options.device or (str(state.device) if state is not None else
                                ("cuda" if torch.cuda.is_available() else "cpu"))
    if not options.progress:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars
    written = 0
    with tqdm(total=len(mine), desc=f"generating (rank {rank})" if world > 1 else "generating", unit="img",
              disable=not options.progress or not mine) as bar:
        for s, source in enumerate(sources):
            todo = [j for j in mine if j.source == s]
            if not todo:
                continue
            pipe = load_personalized(source.model_dir, device=device, dtype=_DTYPES[options.dtype],
                                     allow_pickle=options.allow_pickle)
            check_prompt_tokens(pipe, prompts[s], source.name)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            if source.freecure:
                from ..freecure import FreeCure

                pipe = _FreeCureImages(FreeCure(pipe, **{"allow_pickle": options.allow_pickle, **options.freecure}))
            height = options.height or source.resolution or 512
            width = options.width or source.resolution or 512
            for job in todo:
                generator = torch.Generator(device="cpu").manual_seed(job.seed)
                kwargs = {"negative_prompt": options.negative_prompt} if options.negative_prompt else {}
                image = pipe(prompts[s][job.prompt].text, num_inference_steps=options.steps,
                             guidance_scale=options.guidance, height=height, width=width, generator=generator,
                             **kwargs).images[0]
                save_image_atomic(image, job.path)
                written += 1
                bar.update(1)
            del pipe
    return written


def check_prompt_tokens(pipe, prompts: Sequence[Any], model: str) -> None:
    """Refuse a prompt longer than the text encoder's window before any image is drawn: diffusers would cut it
    silently, and CLIP-T would then score the image against words the model never read."""
    for tokenizer in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)):
        if tokenizer is None:
            continue
        limit = tokenizer.model_max_length
        for prompt in prompts:
            n = len(tokenizer(prompt.text, truncation=False).input_ids)
            if n > limit:
                raise ConfigError(f"{prompt.source or 'prompt'}: {prompt.text!r} is {n} tokens long; the text "
                                  f"encoder of {model} reads at most {limit} (start and end tokens included). "
                                  "Shorten the prompt.")


class _FreeCureImages:
    """FreeCure called like a pipeline: ``.images`` are the repaired images. Explicit attributes that a prompt does
    not name are skipped for that prompt (a prompt set mixes prompts with and without them)."""

    def __init__(self, cure):
        self.cure = cure

    def __call__(self, prompt, *, generator, **kwargs):
        from types import SimpleNamespace

        attributes = self.cure.attributes
        if not isinstance(attributes, str) or attributes != "auto":
            from ..freecure.masks import attribute_list

            named = attribute_list(attributes)
            words = set(re.findall(r"[a-z]+", prompt.lower()))
            kwargs["attributes"] = [a for a in named if set(re.findall(r"[a-z]+", a.lower())) <= words]
        return SimpleNamespace(images=self.cure(prompt, generator=generator, **kwargs).images)


# ------------------------------------------------------------------------------------------------------- scoring


@dataclass
class ImageRow:
    model: str
    prompt_index: int
    prompt: str
    seed: int | None
    path: Path
    scores: dict[str, float] = field(default_factory=dict)


def collect_rows(sources: Sequence[Source], prompts: Sequence[Sequence[Any]], out_dir: Path,
                 images_per_prompt: int, seed: int) -> list[ImageRow]:
    """The images to score: the planned files of generated sources, every image of ``--images`` folders."""
    from ..data.images import list_image_files

    rows: list[ImageRow] = []
    for s, source in enumerate(sources):
        if source.model_dir is not None:
            for p, prompt in enumerate(prompts[s]):
                folder = out_dir / source.name / prompt_dir_name(p, prompt.text)
                for k in range(images_per_prompt):
                    path = folder / f"{k}.png"
                    if not path.is_file():
                        raise ConfigError(f"{path} is missing after generation (did another process fail?)")
                    rows.append(ImageRow(source.name, p, prompt.text, image_seed(seed, p, k, images_per_prompt),
                                         path))
            continue
        by_index: dict[int, Path] = {}
        for child in sorted(source.images_dir.iterdir()):
            m = re.match(r"^(\d+)-(.*)$", child.name)
            if not child.is_dir() or not m:
                continue
            index = int(m.group(1))
            if index >= len(prompts[s]):
                raise ConfigError(f"{child}: prompt index {index}, but the prompt set has {len(prompts[s])} prompts")
            expected = prompt_dir_name(index, prompts[s][index].text)
            if child.name != expected:
                raise ConfigError(f"{child.name} does not match prompt {index} of the prompt set "
                                  f"({prompts[s][index].text!r}, expected folder {expected}); are --prompts and "
                                  "--concept the ones the images were made with?")
            by_index[index] = child
        if not by_index:
            raise ConfigError(f"--images {source.images_dir}: no <prompt-index>-<slug>/ folders (the layout "
                              "evaluate.py writes, e.g. 000-a-sks-dog-in-the-jungle/0.png)")
        for index in sorted(by_index):
            for path in list_image_files(by_index[index]):
                rows.append(ImageRow(source.name, index, prompts[s][index].text, None, path))
    return rows


def score(rows: list[ImageRow], sources: Sequence[Source], prompts: Sequence[Sequence[Any]],
          metrics: dict[str, Any]) -> dict[str, dict]:
    """Fill ``row.scores`` for every metric (NaN where a metric does not apply, e.g. TI-CLIP of a prompt without a
    scene); returns each metric's ``describe()``. Each metric runs batched over all images of a model at once."""
    from ..data.images import load_image_rgb

    by_name = {s.name: (i, s) for i, s in enumerate(sources)}
    images = [load_image_rgb(r.path) for r in tqdm(rows, desc="loading images", unit="img", leave=False,
                                                     disable=len(rows) < 2)]
    for name, metric in metrics.items():
        spec = METRICS[name]
        values = [math.nan] * len(rows)
        extras = {c: [math.nan] * len(rows) for c in spec.extra_columns}
        if spec.input == INPUT_CONCEPTS:
            # group by (model, the prompt's concepts): the references are embedded once per composition
            comp: dict[tuple[int, tuple[int, ...]], list[int]] = {}
            for i, row in enumerate(rows):
                s, _ = by_name[row.model]
                cs = tuple(prompts[s][row.prompt_index].concept_indices)
                if cs:  # a prompt showing no concept is not scored (NaN)
                    comp.setdefault((s, cs), []).append(i)
            for (s, cs), idx in comp.items():
                concepts = []
                for c in cs:
                    refs = sources[s].references[c] if c < len(sources[s].references) else []
                    if not refs:
                        raise ConfigError(f"{name} needs reference images of concept {sources[s].concepts[c]} of "
                                          f"{sources[s].name}: pass --references DIR")
                    concepts.append({"name": sources[s].concepts[c]["identifier"],
                                     "class_noun": sources[s].concepts[c]["class_noun"], "references": refs})
                batch = [images[i] for i in idx]
                result = metric.evaluate(batch, concepts) if hasattr(metric, "evaluate") else None
                out = result.per_image if result is not None else metric(batch, concepts)
                for i, v in zip(idx, out.tolist()):
                    values[i] = v
                for c in spec.extra_columns:
                    for i, v in zip(idx, torch.as_tensor(getattr(result, c)).tolist()):
                        extras[c][i] = v
        elif spec.input == INPUT_REFERENCES:
            # group by (model, concept): the reference embeddings are computed once per concept
            groups: dict[tuple[int, int], list[int]] = {}
            for i, row in enumerate(rows):
                s, _ = by_name[row.model]
                for c in prompts[s][row.prompt_index].concept_indices:
                    groups.setdefault((s, c), []).append(i)
            sums: dict[int, list[float]] = {}
            for (s, c), idx in groups.items():
                refs = sources[s].references[c] if c < len(sources[s].references) else []
                if not refs:
                    raise ConfigError(f"{name} needs reference images of concept {sources[s].concepts[c]} of "
                                      f"{sources[s].name}: pass --references DIR")
                out = metric([images[i] for i in idx], references=refs)
                for i, v in zip(idx, out.tolist()):
                    sums.setdefault(i, []).append(v)
            for i, vs in sums.items():  # a multi-concept prompt: mean over its concepts
                values[i] = sum(vs) / len(vs)
        else:
            attr = "class_prompt" if spec.input == INPUT_CLASS_PROMPT else "scene"
            idx, texts = [], []
            for i, row in enumerate(rows):
                text = getattr(prompts[by_name[row.model][0]][row.prompt_index], attr)
                if text:
                    idx.append(i)
                    texts.append(text)
            if idx:
                out = metric([images[i] for i in idx], texts)
                for i, v in zip(idx, out.tolist()):
                    values[i] = v
        for row, v in zip(rows, values):
            row.scores[name] = float(v)
        for c, vs in extras.items():
            for row, v in zip(rows, vs):
                row.scores[f"{name}_{c}"] = float(v)
    return {name: metric.describe() for name, metric in metrics.items()}


_FID_HINT = ("(On the command line: --fid-feature builtin:toy-clip, or --fid-feature /path/to/a/local/dino-or-open_clip "
             "folder.)")


def check_fid_feature(feature: str) -> None:
    """Fail before any generation where the default Inception extractor cannot load: torch-fidelity missing, or
    its weights neither in torch hub's cache nor downloadable (``HF_HUB_OFFLINE`` set)."""
    import os

    from ..errors import ModelLoadError
    from ..metrics.fid import INCEPTION, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL

    if feature != INCEPTION:
        return
    try:
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        _TORCH_FIDELITY_AVAILABLE = False
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModelLoadError("--fid-feature inception (the default) needs the torch-fidelity package (pip install "
                             f"torch-fidelity) and its weights {INCEPTION_WEIGHTS_FILE}; torch-fidelity is not "
                             f"installed. {_FID_HINT} Such numbers are not comparable with Inception FIDs.")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not cached.is_file() and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelLoadError(f"--fid-feature inception (the default): its weights {INCEPTION_WEIGHTS_FILE} are not in "
                             f"{cached.parent} and this machine is offline (HF_HUB_OFFLINE); download "
                             f"{INCEPTION_WEIGHTS_URL} to that folder. {_FID_HINT}")


def set_distances(rows: list[ImageRow], sources: Sequence[Source], reference: str | Path,
                  options: MetricOptions) -> tuple[dict[str, dict], dict]:
    """Set-level FID and KID (:class:`~t2i_personal.metrics.ImageSetDistance`, feature extractor
    ``options.fid_feature``) of each model's images (all prompts together) against the ``reference`` folder.

    Returns ``({model: {"fid", "kid", "kid_std", "kid_x1e3", "kid_std_x1e3", "kid_subset_size",
    "feature_extractor", "count_generated", "count_reference", "reference", ...}}, describe())``.
    """
    from ..errors import ModelLoadError
    from ..metrics import ImageSetDistance

    try:
        metric = ImageSetDistance(options.fid_feature, pretrained=options.fid_pretrained,
                                  batch_size=options.batch_size, progress=options.progress, device=options.device,
                                  allow_pickle=options.allow_pickle)
    except ModelLoadError as exc:
        raise ModelLoadError(f"--fid-feature {options.fid_feature}: {exc} {_FID_HINT}") from exc
    out: dict[str, dict] = {}
    for source in sources:
        paths = [r.path for r in rows if r.model == source.name]
        try:
            result = metric.evaluate(paths, str(reference))
        except ValueError as exc:  # fewer than 2 images on a side
            raise ConfigError(f"FID/KID of {source.name} against --fid-reference {reference}: {exc}") from exc
        info = result.to_dict()
        out[source.name] = {"fid": info.get("fid"), "kid": info.get("kid"), "kid_std": info.get("kid_std"),
                            "kid_x1e3": info.get("kid_x1e3"), "kid_std_x1e3": info.get("kid_std_x1e3"),
                            "kid_subset_size": info.get("kid_subset_size"),
                            "feature_extractor": info.get("feature_extractor"),
                            "count_generated": result.count_generated, "count_reference": result.count_reference,
                            "reference": str(reference), **({"note": info["note"]} if "note" in info else {})}
    return out, metric.describe()


# -------------------------------------------------------------------------------------------------------- driver


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    prompts: str = "dreambench"
    images_per_prompt: int = 4
    seed: int = 0
    metrics: str | Sequence[str] | None = None
    out: str = "eval_out"
    concepts: list[str] = field(default_factory=list)  # --images mode: IDENTIFIER:CLASS_NOUN
    references: list[str] = field(default_factory=list)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    metric_options: MetricOptions = field(default_factory=MetricOptions)
    bootstrap: int = 0  # 0: normal-approximation CIs; N > 0: percentile bootstrap with N resamples
    fid_reference: str | None = None  # a folder of reference images: FID / KID per model (metric_options.fid_feature)
    freecure: bool = False  # each --model also as "<name>+freecure", generated with FreeCure, scored side by side
    progress: bool = True


def prepare(cfg: EvalConfig) -> tuple[list[Source], list[list[Any]], list[str]]:
    """Validate everything that can fail cheaply (metrics, sources, prompt set) before any model is loaded."""
    from ..data.prompts import load_prompt_set

    names = parse_metric_names(cfg.metrics)
    if cfg.images_per_prompt < 1:
        raise ConfigError(f"--images-per-prompt must be at least 1, not {cfg.images_per_prompt}")
    if not cfg.models and not cfg.images:
        raise ConfigError("nothing to evaluate: pass --model OUTPUT_DIR (repeatable) or --images DIR")
    if "dino_i" in names and not cfg.metric_options.dino_model:
        raise ConfigError("dino_i needs --dino-model (e.g. facebook/dino-vits16 in the local Hugging Face cache, or "
                          "a local transformers folder)")
    if "cp_clip" in names and not 0.0 <= cfg.metric_options.detection_threshold <= 1.0:
        raise ConfigError(f"--detection-threshold must be in [0, 1], not {cfg.metric_options.detection_threshold}")
    if cfg.fid_reference is not None:
        from ..data.images import list_image_files

        ref = Path(cfg.fid_reference).expanduser()
        if not ref.is_dir():
            raise ConfigError(f"--fid-reference {cfg.fid_reference}: no such folder (expected a folder of reference "
                              "images, e.g. the style's artworks)")
        if len(list_image_files(ref)) < 2:
            raise ConfigError(f"--fid-reference {cfg.fid_reference}: FID/KID need at least 2 reference images")
        check_fid_feature(cfg.metric_options.fid_feature)
    sources: list[Source] = []
    need_refs = any(METRICS[n].input in (INPUT_REFERENCES, INPUT_CONCEPTS) for n in names)
    for m in cfg.models:
        sources.append(load_model_source(m, cfg.references or None, need_refs))
    if cfg.generation.freecure and not cfg.freecure:
        raise ConfigError("FreeCure options were given without --freecure")
    if cfg.freecure:  # before any folder is claimed or image generated
        from ..freecure.pipeline import check_options

        check_options(**cfg.generation.freecure)
    if cfg.images:
        concepts = [parse_concept(c) for c in cfg.concepts]
        if not concepts and sources:
            concepts = sources[0].concepts
        if not concepts:
            raise ConfigError("--images needs the concepts the prompts are rendered for: --concept sks:dog "
                              "(repeatable), or a --model whose record gives them")
        for d in cfg.images:
            sources.append(load_images_source(d, concepts, cfg.references or None))
    taken: set[str] = set()
    for s in sources:  # distinct folder names, also against names that already end in -N
        base, n = s.name, 0
        while s.name in taken:
            n += 1
            s.name = f"{base}-{n}"
        taken.add(s.name)
    if cfg.freecure:  # after the names are distinct, so "dog-1" pairs with "dog-1+freecure"
        sources = [v for s in sources for v in
                   ([s, replace(s, name=s.name + FREECURE_SUFFIX, freecure=True)] if s.model_dir is not None else [s])]
    prompts = [load_prompt_set(cfg.prompts, s.concepts) for s in sources]
    return sources, prompts, names


def evaluate(cfg: EvalConfig, state=None) -> dict | None:
    """Generate (resuming), score and report. Returns the summary on the main process, ``None`` elsewhere."""
    from .report import summarize, write_report_html, write_results_csv, write_summary

    sources, prompts, names = prepare(cfg)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(sources, prompts, out_dir, cfg.images_per_prompt, cfg.seed)
    cfg.generation.progress = cfg.progress
    if state is None or state.is_main_process:
        claim_generation_folders(sources, out_dir, cfg)
    if state is not None:
        state.wait_for_everyone()
    generate(sources, prompts, jobs, cfg.generation, state)
    if state is not None:
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
    options = cfg.metric_options
    options.progress = cfg.progress
    if state is not None and cfg.generation.device is None:
        options.device = str(state.device)
    metrics = build_metrics(names, options)
    rows = collect_rows(sources, prompts, out_dir, cfg.images_per_prompt, cfg.seed)
    info = score(rows, sources, prompts, metrics)
    columns = metric_columns(names)
    distances = None
    if cfg.fid_reference is not None:
        distances, info["fid_kid"] = set_distances(rows, sources, cfg.fid_reference, options)
    summary = summarize(rows, columns, info, sources, prompts, bootstrap=cfg.bootstrap, seed=cfg.seed,
                        settings=_settings(cfg), set_metrics=distances)
    write_results_csv(rows, columns, out_dir / "results.csv", out_dir)
    write_summary(summary, out_dir / "summary.json")
    write_report_html(rows, columns, summary, sources, prompts, out_dir)
    return summary


GENERATION_RECORD = "generation.json"


def claim_generation_folders(sources: Sequence[Source], out_dir: Path, cfg: EvalConfig) -> None:
    """Each generating model's folder records which model and settings made its images; a rerun that would
    reuse images made by another model or other settings is refused instead of silently scoring them."""
    import json

    from ..atomic import write_json_atomic

    g = cfg.generation
    for s in sources:
        if s.model_dir is None:
            continue
        claim = {"model": str(Path(s.model_dir).resolve()), "prompts": str(cfg.prompts), "seed": cfg.seed,
                 "images_per_prompt": cfg.images_per_prompt, "steps": g.steps, "guidance": g.guidance,
                 "height": g.height, "width": g.width, "dtype": g.dtype, "negative_prompt": g.negative_prompt,
                 "freecure": {k: str(v) for k, v in g.freecure.items()} if s.freecure else None}
        path = out_dir / s.name / GENERATION_RECORD
        if path.is_file():
            old = json.loads(path.read_text())
            changed = sorted(k for k in claim if old.get(k) != claim[k])
            if changed:
                details = "; ".join(f"{k}: {old.get(k)!r} -> {claim[k]!r}" for k in changed)
                raise ConfigError(f"{path.parent} holds images generated differently ({details}); resuming would "
                                  "score them as this model's. Use a new --out, or delete that folder.")
        else:
            write_json_atomic(path, claim)


def _settings(cfg: EvalConfig) -> dict:
    g = cfg.generation
    return {"prompts": cfg.prompts, "images_per_prompt": cfg.images_per_prompt, "seed": cfg.seed,
            "seed_rule": "seed + prompt_index * images_per_prompt + k", "steps": g.steps, "guidance": g.guidance,
            "height": g.height, "width": g.width, "dtype": g.dtype, "negative_prompt": g.negative_prompt,
            "models": list(cfg.models), "images": list(cfg.images), "fid_reference": cfg.fid_reference,
            "freecure": {k: str(v) for k, v in g.freecure.items()} if cfg.freecure else None}
