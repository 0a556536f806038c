"""What the tabs draw: the training progress bar, the loss curve, the score bars.

Figures are matplotlib ``Figure`` objects, not pyplot: the Train tab's timer and Evaluate draw from different
threads, and pyplot's global state is not thread-safe.
"""

from __future__ import annotations

from pathlib import Path


def progress_bar(step: int, total: int) -> str:
    return (f'<progress value="{step}" max="{max(1, total)}" style="width:100%;height:14px"></progress>'
            f'<div style="text-align:right;font-size:12px">{step} / {total} steps</div>')


def loss_figure(lines: list[dict]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.6), tight_layout=True)
    ax = fig.add_subplot()
    steps = [line for line in lines if "loss" in line]
    if steps:
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    return fig


def score_chart(rows: list[list]):
    """Grouped bars of the metric table's rows (model, metric, mean, CI): one group per metric."""
    from matplotlib.figure import Figure

    metrics = sorted({r[1] for r in rows})
    models = sorted({r[0] for r in rows})
    fig = Figure(figsize=(6, 3), tight_layout=True)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [next((r[2] or 0 for r in rows if r[0] == model and r[1] == m), 0) for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=Path(model).name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.legend(fontsize=7)
    return fig
