"""Evaluation of trained results over prompt sets: generation (resumable, multi-process), metrics, reports.

>>> from t2i_personal.evaluation import EvalConfig, evaluate
>>> evaluate(EvalConfig(models=["outputs/my-dog"], prompts="dreambench-live", out="eval_out"))

``python eval/evaluate.py --help`` is the command-line front end. The modules, usable on their own:

* :mod:`.registry`: the metric registry (:data:`METRICS`, :func:`register_metric`: name -> factory);
* :mod:`.sources`: what is evaluated (trained results, folders of images) with their concepts and references;
* :mod:`.layout`: the output folder (where each image goes, its seed) and reading the images back;
* :mod:`.generation`: rendering the missing images, split across ``accelerate`` processes;
* :mod:`.scoring`: per-image metrics and set-level FID / KID;
* :mod:`.report`: ``results.csv``, ``summary.json`` and ``report.html``;
* :mod:`.run`: the driver, :func:`prepare` and :func:`evaluate`.
"""

from .generation import GenerationOptions
from .layout import plan_jobs
from .registry import (DEFAULT_METRICS, METRICS, MetricOptions, MetricSpec, build_metrics, parse_metric_names,
                       register_metric)
from .report import summarize, write_report_html, write_results_csv, write_summary
from .run import EvalConfig, evaluate, prepare
from .sources import Source

__all__ = ["DEFAULT_METRICS", "METRICS", "EvalConfig", "GenerationOptions", "MetricOptions", "MetricSpec", "Source",
           "build_metrics", "evaluate", "parse_metric_names", "plan_jobs", "prepare", "register_metric",
           "summarize", "write_report_html", "write_results_csv", "write_summary"]
