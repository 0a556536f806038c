"""Evaluation for the Evaluate tab: ``eval/evaluate.py``'s engine on picked results, its scores as table rows,
and its HTML report put where the app serves it."""

from __future__ import annotations

import os
import shutil
import time
import urllib.parse
from pathlib import Path

from t2i_personal.atomic import write_text_atomic
from t2i_personal.errors import UserError

from .errors import DemoError
from .workspace import Workspace, unique_folder

PROMPT_SETS = ("dreambench", "dreambench-live", "dreambench-objects", "pasted list")


def run_evaluation(workspace: Workspace, results: list[str], prompt_set: str, pasted: str = "",
                   images_per_prompt: int = 1, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                   progress: bool = True) -> tuple[dict, Path]:
    """``eval/evaluate.py``'s engine on ``results``; returns (summary, output folder with report.html)."""
    from t2i_personal.evaluation import EvalConfig, GenerationOptions, evaluate

    if not results:
        raise DemoError("pick at least one trained result to evaluate")
    results = [workspace.check_result(r) for r in results]
    lines = [line.strip() for line in (pasted or "").splitlines() if line.strip()]
    if prompt_set == "pasted list" and not lines:
        raise DemoError("paste one prompt per line ({V} = identifier, {C} = class noun), or pick a prompt set")
    if prompt_set not in PROMPT_SETS:
        raise DemoError(f"unknown prompt set {prompt_set!r}; choose one of {', '.join(PROMPT_SETS)}")
    out = unique_folder(workspace.root / "evals", time.strftime("eval-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True)
    if prompt_set == "pasted list":
        prompt_set = str(write_text_atomic(out / "prompts.txt", "\n".join(lines) + "\n"))
    cfg = EvalConfig(models=list(results), prompts=prompt_set, images_per_prompt=int(images_per_prompt),
                     seed=int(seed or 0), out=str(out / "results"), progress=progress,
                     generation=GenerationOptions(steps=int(steps), guidance=float(guidance), progress=progress))
    try:
        summary = evaluate(cfg)
    except (UserError, OSError, ValueError, RuntimeError) as exc:
        raise DemoError(f"{type(exc).__name__}: {exc}") from exc
    return summary, out / "results"


def publish_report(workspace: Workspace, results_dir: Path) -> tuple[Path, Path]:
    """The evaluation folder (report.html, its charts and grids, the images, results.csv) put where the app serves
    it, ``downloads/<name>/`` (hard links, so no second copy on disk), and as one zip there; report.html links its
    pictures relatively, so it opens from the served folder. Returns (served report.html, zip)."""
    downloads = workspace.root / "downloads"
    downloads.mkdir(exist_ok=True)
    served = unique_folder(downloads, results_dir.parent.name)
    shutil.copytree(results_dir, served, copy_function=_link_or_copy)
    archive = Path(shutil.make_archive(str(served), "zip", root_dir=results_dir))
    return served / "report.html", archive


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def report_link(report_html: Path) -> str:
    """An HTML link that opens the served report in a new tab (relative to the page, so it survives a proxy)."""
    return (f'<a href="gradio_api/file={urllib.parse.quote(str(report_html))}" target="_blank" '
            'id="eval-report-link">open the HTML report (new tab)</a>')


def summary_table(summary: dict) -> list[list]:
    """Rows of (model, metric, mean, 95% CI) for the metric table."""
    rows = []
    for model, data in summary["models"].items():
        for metric, stats in data["overall"].items():
            mean, low, high = stats.get("mean"), stats.get("ci95_low"), stats.get("ci95_high")
            rows.append([model, metric, None if mean is None else round(mean, 4),
                         "" if low is None else f"{low:.4f} - {high:.4f}"])
    return rows
