"""The evaluation run: check everything cheap first (:func:`prepare`), then generate (resuming), score and write
``results.csv``, ``summary.json`` and ``report.html`` (:func:`evaluate`). The folder layout is in :mod:`.layout`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..errors import ConfigError
from .generation import GenerationOptions, generate
from .layout import GENERATION_RECORD, collect_rows, plan_jobs
from .registry import (INPUT_CONCEPTS, INPUT_REFERENCES, METRICS, MetricOptions, build_metrics, metric_columns,
                       parse_metric_names)
from .report import summarize, write_report_html, write_results_csv, write_summary
from .scoring import check_fid_feature, score, set_distances
from .sources import (Source, load_images_source, load_model_source, make_names_distinct, parse_concept,
                      with_freecure_twins)


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
    _check_metric_options(cfg, names)
    need_refs = any(METRICS[n].input in (INPUT_REFERENCES, INPUT_CONCEPTS) for n in names)
    sources = [load_model_source(m, cfg.references or None, need_refs) for m in cfg.models]
    if cfg.generation.freecure.given() and not cfg.freecure:
        raise ConfigError("FreeCure options were given without --freecure")
    if cfg.freecure:  # before any folder is claimed or image generated
        cfg.generation.freecure.check()
    if cfg.images:
        concepts = [parse_concept(c) for c in cfg.concepts]
        if not concepts and sources:
            concepts = sources[0].concepts
        if not concepts:
            raise ConfigError("--images needs the concepts the prompts are rendered for: --concept sks:dog "
                              "(repeatable), or a --model whose record gives them")
        sources += [load_images_source(d, concepts, cfg.references or None) for d in cfg.images]
    make_names_distinct(sources)
    if cfg.freecure:
        sources = with_freecure_twins(sources)
    prompts = [load_prompt_set(cfg.prompts, s.concepts) for s in sources]
    return sources, prompts, names


def _check_metric_options(cfg: EvalConfig, names: list[str]) -> None:
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


def evaluate(cfg: EvalConfig, state=None) -> dict | None:
    """Generate (resuming), score and report. Returns the summary on the main process, ``None`` elsewhere."""
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


def claim_generation_folders(sources: Sequence[Source], out_dir: Path, cfg: EvalConfig) -> None:
    """Each generating model's folder records which model and settings made its images; a rerun that would
    reuse images made by another model or other settings is refused instead of silently scoring them."""
    g = cfg.generation
    for s in sources:
        if s.model_dir is None:
            continue
        claim = {"model": str(Path(s.model_dir).resolve()), "prompts": str(cfg.prompts), "seed": cfg.seed,
                 "images_per_prompt": cfg.images_per_prompt, "steps": g.steps, "guidance": g.guidance,
                 "height": g.height, "width": g.width, "dtype": g.dtype, "negative_prompt": g.negative_prompt,
                 "freecure": g.freecure.given() if s.freecure else None}
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
            "freecure": g.freecure.given() if cfg.freecure else None}
