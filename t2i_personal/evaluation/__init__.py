"""Evaluation of trained results over prompt sets: generation (resumable, multi-process), metrics, reports.

>>> from t2i_personal.evaluation import EvalConfig, evaluate
>>> evaluate(EvalConfig(models=["outputs/my-dog"], prompts="dreambench-live", out="eval_out"))

``python eval/evaluate.py --help`` is the command-line front end; :data:`METRICS` / :func:`register_metric` is the
metric registry (name -> factory).
"""

from .engine import (
                     DEFAULT_METRICS,
                     METRICS,
                     EvalConfig,
                     GenerationOptions,
                     MetricOptions,
                     MetricSpec,
                     Source,
                     build_metrics,
                     evaluate,
                     parse_metric_names,
                     plan_jobs,
                     prepare,
                     register_metric,
)
from .report import summarize, write_report_html, write_results_csv, write_summary

__all__ = ["DEFAULT_METRICS", "METRICS", "EvalConfig", "GenerationOptions", "MetricOptions", "MetricSpec", "Source",
           "build_metrics", "evaluate", "parse_metric_names", "plan_jobs", "prepare", "register_metric",
           "summarize", "write_report_html", "write_results_csv", "write_summary"]
