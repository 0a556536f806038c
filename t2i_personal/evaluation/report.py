"""Writing evaluation results: ``results.csv``, ``summary.json`` and a self-contained ``report.html``.

Confidence intervals are 95 %: by default the normal approximation ``mean ± 1.96 · s / √n`` (``s`` the sample
standard deviation, ``n`` the number of images with a finite score; ``null`` when ``n < 2``); with
``bootstrap=N`` the 2.5/97.5 percentiles of ``N`` bootstrap resamples of the per-image scores (seeded).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes_atomic, write_text_atomic
from .layout import prompt_dir_name

Z95 = 1.959963984540054


def _stats(values: list[float], bootstrap: int = 0, seed: int = 0) -> dict:
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        return {"mean": None, "ci95_low": None, "ci95_high": None, "std": None, "n": 0}
    mean = float(finite.mean())
    std = float(finite.std(ddof=1)) if n > 1 else None
    low = high = None
    if n > 1:
        if bootstrap > 0:
            rng = np.random.default_rng(seed)
            means = finite[rng.integers(0, n, size=(bootstrap, n))].mean(axis=1)
            low, high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
        else:
            half = Z95 * std / math.sqrt(n)
            low, high = mean - half, mean + half
    return {"mean": mean, "ci95_low": low, "ci95_high": high, "std": std, "n": n}


def summarize(rows, names: list[str], info: dict[str, dict], sources, prompts, *, bootstrap: int = 0, seed: int = 0,
              settings: dict | None = None, set_metrics: dict[str, dict] | None = None) -> dict:
    """Per model: overall and per prompt, for each per-image column (``names``: metrics and their extra columns
    such as ``cp_clip_detection_rate``), mean, 95 % CI, std and n; plus the metrics' describe().

    ``set_metrics``: per model, set-level values (FID / KID, see :func:`~.scoring.set_distances`), stored as the
    model's ``fid_kid``."""
    from .. import __version__ as version

    ci = (f"percentile bootstrap, {bootstrap} resamples of the per-image scores (seed {seed})" if bootstrap > 0
          else "normal approximation: mean ± 1.96 · sample std / sqrt(n), over per-image scores")
    models: dict[str, Any] = {}
    for s, source in enumerate(sources):
        mine = [r for r in rows if r.model == source.name]
        per_prompt = []
        for p, prompt in enumerate(prompts[s]):
            pr = [r for r in mine if r.prompt_index == p]
            if not pr:
                continue
            per_prompt.append({
                "index": p, "prompt": prompt.text, "class_prompt": prompt.class_prompt, "scene": prompt.scene,
                "category": prompt.category, "images": len(pr),
                "metrics": {m: _stats([r.scores[m] for r in pr], bootstrap, seed) for m in names}})
        models[source.name] = {
            "source": str(source.model_dir or source.images_dir), "kind": "model" if source.model_dir else "images",
            "concepts": source.concepts, "images": len(mine),
            "overall": {m: _stats([r.scores[m] for r in mine], bootstrap, seed) for m in names},
            "per_prompt": per_prompt}
        if set_metrics is not None and source.name in set_metrics:
            models[source.name]["fid_kid"] = set_metrics[source.name]
    return {"t2i_personal_version": version, "confidence_interval": ci, "metrics": info,
            "settings": settings or {}, "models": models}


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_summary(summary: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(_json_safe(summary), indent=2) + "\n")


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def write_results_csv(rows, names: list[str], path: Path, base: Path) -> None:
    """One row per image: model, prompt_index, prompt, seed, path (relative to the output folder), each metric
    (``repr`` of the float, so the file holds the exact values; empty where the metric does not apply)."""
    buffer = io.StringIO(newline="")  # the csv module writes its own \r\n line ends
    writer = csv.writer(buffer)
    writer.writerow(["model", "prompt_index", "prompt", "seed", "path", *names])
    for r in rows:
        writer.writerow([r.model, r.prompt_index, r.prompt, "" if r.seed is None else r.seed, _rel(r.path, base),
                         *[repr(r.scores[m]) if math.isfinite(r.scores[m]) else "" for m in names]])
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------- HTML


def _fmt(stats: dict) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["ci95_low"] is None:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} [{stats['ci95_low']:.4f}, {stats['ci95_high']:.4f}]"


def _fid_cells(data: dict | None) -> list[str]:
    if not data:
        return ["–"] * 4
    fid = "–" if data.get("fid") is None else f"{data['fid']:.4f}"
    kid = ("–" if data.get("kid") is None else
           f"{data['kid'] * 1e3:.4f} ± {(data.get('kid_std') or 0.0) * 1e3:.4f}")
    subset = "–" if data.get("kid_subset_size") is None else str(data["kid_subset_size"])
    return [fid, kid, subset, str(data.get("feature_extractor") or "–")]


def _bar_chart(summary: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary["models"])
    means = [summary["models"][m]["overall"][metric]["mean"] for m in models]
    lows = [summary["models"][m]["overall"][metric]["ci95_low"] for m in models]
    highs = [summary["models"][m]["overall"][metric]["ci95_high"] for m in models]
    y = [v if v is not None else 0.0 for v in means]
    err = [[(v - lo) if (v is not None and lo is not None) else 0.0 for v, lo in zip(means, lows)],
           [(hi - v) if (v is not None and hi is not None) else 0.0 for v, hi in zip(means, highs)]]
    fig, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(models) + 1.5), 3.0), dpi=100)
    ax.bar(range(len(models)), y, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
    ax.set_title(f"{metric} (mean, 95% CI)", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_report_html(rows, names: list[str], summary: dict, sources, prompts, out_dir: Path) -> Path:
    """``report.html`` with a metric table, bar charts (PNG) and a grid PNG per model and prompt, all linked
    relatively from ``out_dir/report/``; text is escaped with :func:`html.escape`."""
    out_dir = Path(out_dir)
    assets = out_dir / "report"
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>t2i-personal evaluation</title>",
             ("<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
               "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
              ".grid{display:inline-block;margin:4px 12px 12px 0;vertical-align:top}"
              ".grid img{max-width:384px;image-rendering:pixelated;border:1px solid #ccc}"
              "code{background:#f4f4f4}</style></head><body>"),
             "<h1>t2i-personal evaluation</h1>",
             (f"<p>Prompt set <code>{esc(str(summary['settings'].get('prompts')))}</code>, "
              f"{esc(str(summary['settings'].get('images_per_prompt')))} images per prompt, seed "
              f"{esc(str(summary['settings'].get('seed')))}. Scores are raw cosine. 95% CI: "
              f"{esc(summary['confidence_interval'])}.</p>"),
             "<h2>Metrics</h2><table><tr><th>model</th><th>images</th>"]
    parts += [f"<th>{esc(m)}</th>" for m in names]
    with_fid = any("fid_kid" in d for d in summary["models"].values())
    if with_fid:
        parts += [f"<th>{h}</th>" for h in ("FID", "KID ×10³ (± std)", "KID subset size", "FID/KID features")]
    parts.append("</tr>")
    for model, data in summary["models"].items():
        cells = "".join(f"<td>{esc(_fmt(data['overall'][m]))}</td>" for m in names)
        if with_fid:
            cells += "".join(f"<td>{esc(v)}</td>" for v in _fid_cells(data.get("fid_kid")))
        parts.append(f"<tr><td>{esc(model)}</td><td>{data['images']}</td>{cells}</tr>")
    parts.append("</table>")
    if with_fid:
        ref = next(d["fid_kid"].get("reference") for d in summary["models"].values() if "fid_kid" in d)
        parts.append(f"<p>FID / KID: each model's images (all prompts) against the reference folder "
                     f"<code>{esc(str(ref))}</code>; numbers from different feature extractors are not comparable."
                     "</p>")
    parts.append("<h3>What was computed</h3><ul>")
    for m in [*names, *(["fid_kid"] if with_fid else [])]:
        if m not in summary["metrics"]:
            continue  # an extra column (cp_clip_detection_rate): described with its metric
        desc = ", ".join(f"{k}: {v}" for k, v in summary["metrics"].get(m, {}).items())
        parts.append(f"<li><b>{esc(m)}</b>: {esc(desc)}</li>")
    parts.append("</ul><h2>Charts</h2>")
    for m in names:
        chart = assets / f"chart-{m}.png"
        _bar_chart(summary, m, chart)
        parts.append(f"<img src='{esc(_rel(chart, out_dir), quote=True)}' alt='{esc(m, quote=True)}'>")

    parts.append("<h2>Per prompt</h2><table><tr><th>#</th><th>prompt</th><th>model</th>"
                 + "".join(f"<th>{esc(m)}</th>" for m in names) + "</tr>")
    for model, data in summary["models"].items():
        for item in data["per_prompt"]:
            parts.append(f"<tr><td>{item['index']}</td><td>{esc(item['prompt'])}</td><td>{esc(model)}</td>"
                         + "".join(f"<td>{esc(_fmt(item['metrics'][m]))}</td>" for m in names) + "</tr>")
    parts.append("</table>")
    parts += _image_grids(rows, names, summary, sources, prompts, out_dir)
    parts.append("</body></html>")
    path = out_dir / "report.html"
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path


def _image_grids(rows, names: list[str], summary: dict, sources, prompts, out_dir: Path) -> list[str]:
    """The report's images section: per prompt, each model's images as one grid PNG with its scores."""
    from ..data.images import load_image_rgb, make_image_grid, save_image_atomic

    esc = html.escape
    parts = ["<h2>Images</h2>"]
    by_key: dict[tuple[str, int], list] = {}
    for r in rows:
        by_key.setdefault((r.model, r.prompt_index), []).append(r)
    indices = sorted({r.prompt_index for r in rows})
    for p in indices:
        texts = {prompts[s][p].text for s in range(len(sources)) if p < len(prompts[s])}
        parts.append(f"<h3>{p}. {esc(' / '.join(sorted(texts)))}</h3>")
        for s, source in enumerate(sources):
            group = by_key.get((source.name, p))
            if not group:
                continue
            grid_path = out_dir / "report" / "grids" / source.name / f"{prompt_dir_name(p, prompts[s][p].text)}.png"
            save_image_atomic(make_image_grid([load_image_rgb(r.path) for r in group], rows=1), grid_path)
            stats = summary["models"][source.name]["per_prompt"]
            stat = next((x for x in stats if x["index"] == p), None)
            scores = "; ".join(f"{m} {_fmt(stat['metrics'][m])}" for m in names) if stat else ""
            links = " ".join(f"<a href='{esc(_rel(r.path, out_dir), quote=True)}'>{i}</a>"
                             for i, r in enumerate(group))
            parts.append(f"<div class='grid'><div><b>{esc(source.name)}</b></div>"
                         f"<img src='{esc(_rel(grid_path, out_dir), quote=True)}' "
                         f"alt='{esc(prompts[s][p].text, quote=True)}'><div>{esc(scores)}</div>"
                         f"<div>images: {links}</div></div>")
    return parts
