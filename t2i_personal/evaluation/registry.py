"""The evaluator's metric registry: metric name -> factory, and what each image is scored against.

``evaluate.py --metrics NAME`` builds ``METRICS[NAME].factory(options)``; :func:`register_metric` adds one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

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
