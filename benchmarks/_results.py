"""What a toy-world benchmark records, so that every figure it reports can be recomputed and its README table written.

A benchmark's result file holds, per row (a method, a model, a FreeCure weight) and training seed, every image's
outcome for every figure it reads::

    {"benchmark": "style", "base": "builtin:toy", "command": "python benchmarks/toyworld_style.py ...",
     "train_seeds": 3, "images_per_cell": 48, "baseline": "base model", "date": "2026-12-06", "commit": "abc1234",
     "machine": {"cpu_capability": "AVX512", "threads": 2, ...},
     "seconds": {...}, "summary": {row: {figure: interval, "one_run": {figure: interval},
                                         "difference": {figure: interval}}},
     "outcomes": {row: [{figure: [one value per image]} for each training seed]}}

``summary`` is :func:`summarize` of ``outcomes`` (a test recomputes it); ``benchmarks/readme_tables.py`` writes the
README's tables from these files. Rows that do not depend on training (the base model, the reference images) are
recorded once per training seed all the same, so that differences against them pair seed by seed.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from t2i_personal.evaluation.intervals import (bootstrap_interval, one_run_interval,  # noqa: E402
                                               paired_difference)


def commit() -> str:
    """The commit a run measured, marked when tracked files other than the README and docs/ (which cannot change a
    measurement) had changes on top of it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":!README.md", ":!docs") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(script: str, argv: list[str] | None) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["python", script] + [a if " " not in a else repr(a) for a in args])


AT_START = commit()  # the code a benchmark runs is what was there when it started, not when it finishes


def figures_of(seeds: list[dict]) -> list[str]:
    return [k for k in seeds[0] if all(k in s for s in seeds)]


def summarize(outcomes: dict[str, list[dict]], baseline: str | None = None) -> dict:
    """Per row and figure the mean with its two-level 95 % interval, where one more training run should land
    (``one_run``), and the paired difference from ``baseline`` on every figure both rows have (:func:`paired`)."""
    summary = {}
    for row, seeds in outcomes.items():
        entry = {f: bootstrap_interval([s[f] for s in seeds]).as_dict() for f in figures_of(seeds)}
        entry["one_run"] = {f: one_run_interval([s[f] for s in seeds]).as_dict() for f in figures_of(seeds)}
        if baseline is not None and row != baseline and baseline in outcomes:
            differences = {f: paired(outcomes, row, baseline, f) for f in figures_of(seeds)}
            if any(d is not None for d in differences.values()):
                entry["difference"] = {f: d.as_dict() for f, d in differences.items() if d is not None}
        summary[row] = entry
    return summary


def paired(outcomes: dict[str, list[dict]], row: str, other: str, figure: str):
    """``row − other`` on ``figure`` over the training seeds both have (seeds 0..k-1 of each), or None where they
    do not pair (a figure one lacks, different images)."""
    a, b = outcomes.get(row), outcomes.get(other)
    if not a or not b or not all(figure in s for s in a + b):
        return None
    k = min(len(a), len(b))
    a, b = [s[figure] for s in a[:k]], [s[figure] for s in b[:k]]
    if any(len(x) != len(y) for x, y in zip(a, b)):
        return None
    return paired_difference(a, b)


def machine() -> dict:
    """What the floating point of a run depended on: a rerun elsewhere differs through these."""
    import platform

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def record(*, benchmark: str, base: str, script: str, argv: list[str] | None, outcomes: dict[str, list[dict]],
           baseline: str | None, train_seeds: int, images_per_cell: int, **extra) -> dict:
    """The result file's content (module docstring); ``extra`` keys are kept as given."""
    return {"benchmark": benchmark, "command": command_line(script, argv), "base": base, "train_seeds": train_seeds,
            "images_per_cell": images_per_cell, "baseline": baseline, "date": datetime.date.today().isoformat(),
            "commit": AT_START, "machine": machine(), **extra, "summary": summarize(outcomes, baseline),
            "outcomes": {row: [{f: list(v) for f, v in s.items()} for s in seeds] for row, seeds in outcomes.items()}}


def print_summary(result: dict, figures: list[str], digits: int = 2) -> None:
    """The summary as a plain-text table: per row the mean [95 % interval] of each figure, then its paired
    difference from the baseline ("~0": the interval contains 0)."""
    from t2i_personal.evaluation.intervals import Interval

    def cell(stats, signed=False):
        return "-" if stats is None else Interval(**stats).text(digits, signed=signed)

    width = max(len(row) for row in result["summary"]) + 2
    print(f"\n{result['train_seeds']} training seed(s) x {result['images_per_cell']} images per cell; mean [95% "
          f"interval]; difference from {result['baseline']} on paired seeds and images (~0: the interval contains 0)")
    print(f"{'':{width}s} " + " ".join(f"{f:>22s}" for f in figures))
    for row, entry in result["summary"].items():
        print(f"{row:{width}s} " + " ".join(f"{cell(entry.get(f)):>22s}" for f in figures))
        if "difference" in entry:
            print(f"{'  - ' + str(result['baseline']):{width}s} "
                  + " ".join(f"{cell(entry['difference'].get(f), True):>22s}" for f in figures))
