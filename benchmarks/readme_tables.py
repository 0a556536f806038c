"""Write the README's toy-world tables from the benchmarks' result files, so that each table is what was measured.

    python benchmarks/toyworld_methods.py [--base builtin:toy-flux]      # outputs/methods*/methods.json
    python benchmarks/toyworld_style.py [--base builtin:toy-flux]        # outputs/style*/style.json
    python benchmarks/toyworld_freecure.py [--base builtin:toy-flux]     # outputs/freecure*/freecure.json
    python benchmarks/readme_tables.py outputs/methods/methods.json ...  # take them in, rewrite the README
    python benchmarks/readme_tables.py --check                           # README == docs/results (a test)

Each given file is copied to ``docs/results/<benchmark>-<generator>.json`` (every image's outcome included, so
anyone can recompute the intervals; ``benchmarks/_results.py`` says what a file holds), then each README block
between ``<!-- generated: <benchmark> -->`` and ``<!-- end generated: <benchmark> -->`` is rewritten from every
file of that benchmark: the provenance of each (command, training seeds, images per cell, date, commit), one column
group per generator with the mean and 95 % interval of each figure, and the paired differences :data:`TABLES`
names for it (``~0``: the interval contains 0). Everything is recomputed from the outcomes; the differences are
also drawn (``docs/toyworld-<benchmark>-differences.png``, a forest plot).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import paired  # noqa: E402
from t2i_personal.evaluation.intervals import bootstrap_interval, one_run_interval  # noqa: E402

RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
GENERATORS = {"builtin:toy": "toy-sd", "builtin:toy-flux": "toy-flux"}  # column order


@dataclass
class Table:
    """How one benchmark's results are shown: its figures (outcome key -> column title, decimals) and row labels, and
    the paired differences, as titled groups of (row, minus row) computed from the rows a result file has."""
    figures: dict[str, tuple[str, int]]
    row_title: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    differences: Callable[[list[str], str], list] = None  # (rows, baseline) -> [(title, [(row, other), ...]), ...]
    order: Callable[[str], float] | None = None  # a sort key for the rows (default: as the result files list them)
    one_run: tuple[str, ...] = ()  # rows whose single-run range is stated: what a user's rerun should land in

    def label(self, row: str) -> str:
        return self.labels.get(row, row.replace("omega ", "ω = "))


METHOD_LABELS = {
    "dreambooth-lora-400": "DreamBooth-LoRA, `sks`, 400 steps",
    "dreambooth-lora": "DreamBooth-LoRA, `sks`, 600 steps (the quickstart)",
    "lora-token": "LoRA + learned `<new1>`",
    "lora-token-spl": "LoRA + `<new1>` + SPL (λ = 1)",
    "custom-diffusion": "Custom Diffusion + `<new1>`",
    "classdiffusion": "ClassDiffusion (Custom Diffusion + `<new1>` + SPL, λ = 1)",
    "classdiffusion-0.3": "ClassDiffusion, λ = 0.3",
    "classdiffusion-0.1": "ClassDiffusion, λ = 0.1",
    "diffusers-script": "diffusers' `train_dreambooth_lora.py`, its defaults",
    "lora-token-250": "LoRA + learned `<new1>`, 250 steps",
}
SPL_PAIRS = {"lora-token-spl": "lora-token", "classdiffusion": "custom-diffusion",  # with SPL -> the same without
             "classdiffusion-0.3": "custom-diffusion", "classdiffusion-0.1": "custom-diffusion"}


def _method_differences(rows: list[str], baseline: str):
    return [(f"difference from {METHOD_LABELS.get(baseline, baseline)}", [(r, baseline) for r in rows if r != baseline]),
            ("what SPL adds (paired)", [(a, b) for a, b in SPL_PAIRS.items() if a in rows and b in rows]),
            ("what the quickstart's choices buy over diffusers' script (paired)",
             [("dreambooth-lora", "diffusers-script")] if {"dreambooth-lora", "diffusers-script"} <= set(rows) else [])]


def _style_differences(rows: list[str], baseline: str):
    tuned = [r for r in rows if r.startswith("tuned")]
    return [("difference (paired: same contents, same noise)",
             [(r, baseline) for r in tuned] + ([tuple(tuned)] if len(tuned) == 2 else []))]


def _real_photo_differences(rows: list[str], baseline: str):
    return [("difference from the square center crop (paired)", [(r, baseline) for r in rows if r != baseline]),
            ("what buckets add to masks (paired)",
             [("buckets+masks", "masks")] if {"buckets+masks", "masks"} <= set(rows) else [])]


def _omega(row: str) -> float:
    return float(row.split()[-1]) if row.startswith("FreeCure, omega ") else -1.0


def _freecure_differences(rows: list[str], baseline: str):
    cures = sorted((r for r in rows if _omega(r) >= 0), key=_omega)
    return [(f"difference from the {baseline} image (paired: same prompt, same noise)",
             [(r, baseline) for r in rows if r != baseline]),
            (f"a stronger ω than {_omega(cures[0]):g} (paired)" if cures else "", [(r, cures[0]) for r in cures[1:]])]


TABLES = {
    "methods": Table({"subject": ("subject", 2), "scene": ("scene", 2), "drift": ("drift", 2)}, "run", METHOD_LABELS,
                     _method_differences, one_run=("dreambooth-lora",)),
    "style": Table({"palette": ("palette adherence", 2), "class": ("class read", 2)}, "images",
                   {"tuned, style prompt": "tuned, `zwx style` prompt", "tuned, plain prompt": "tuned, plain prompt"},
                   _style_differences),
    "real_photos": Table({"subject": ("subject", 2), "scene": ("scene", 2), "drift": ("drift", 2)}, "run",
                         {"square": "square center crop", "buckets": "`data.buckets`", "masks": "`data.masks: files`",
                          "buckets+masks": "buckets + masks",
                          "auto-masks": "masks from `builtin:toy-segmenter` (`python -m t2i_personal.mask`)"},
                         _real_photo_differences),
    "freecure": Table({"hair": ("hair as asked", 2), "change_inside": ("change inside the mask", 1),
                       "change_outside": ("change outside", 1)}, "images",
                      {"personalized": "personalized (`configs/quickstart_face[_flux].yaml`)",
                       "foundation": "foundation (LoRA off)"}, _freecure_differences, order=_omega),
}


def load_results(benchmark: str, folder: Path = RESULTS) -> dict[str, dict]:
    """generator label -> result file, in :data:`GENERATORS` order."""
    found = {}
    for path in sorted(folder.glob(f"{benchmark}-*.json")):
        data = json.loads(path.read_text())
        found[GENERATORS.get(data["base"], data["base"])] = data
    order = list(GENERATORS.values())
    return dict(sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _rows(benchmark: str, results: dict[str, dict]) -> list[str]:
    """Every row any generator has, in the first file's order (or the table's)."""
    rows = []
    for data in results.values():
        rows += [r for r in data["outcomes"] if r not in rows]
    return sorted(rows, key=TABLES[benchmark].order) if TABLES[benchmark].order else rows


def _scores(data: dict, row: str, figure: str):
    seeds = data["outcomes"].get(row)
    if not seeds or not all(figure in s for s in seeds):
        return None
    return [s[figure] for s in seeds]


def render(benchmark: str, results: dict[str, dict]) -> str:
    """The markdown block: provenance lines, the figures table, each group of paired differences."""
    if not results:
        raise SystemExit(f"no {benchmark}-*.json in {RESULTS}: run the benchmark and pass its result file")
    table = TABLES[benchmark]
    gens = list(results)
    rows = _rows(benchmark, results)
    lines = [f"- {gen}: `{data['command']}` — {data['train_seeds']} training seed(s) × {data['images_per_cell']} "
             "images per cell" + "".join(f" ({k} seeds: {table.label(r)})" for r, k in data.get("run_seeds", {}).items())
             + f", {data['date']}, commit {data['commit']}"
             + (f", {data['machine']['cpu_capability']} CPU, {data['machine']['threads']} threads"
                if "machine" in data else "")
             for gen, data in results.items()]
    columns = [(g, f) for g in gens for f in table.figures]
    header = " | ".join(f"{table.figures[f][0]} ({g})" for g, f in columns) + " |"
    rule = "|---|" + "---|" * len(columns)

    lines += ["", f"| {table.row_title} | {header}", rule]
    for row in rows:
        values = []
        for g, f in columns:
            scores = _scores(results[g], row, f)
            values.append("–" if scores is None else bootstrap_interval(scores).text(table.figures[f][1]))
        lines.append(f"| {table.label(row)} | " + " | ".join(values) + " |")
    for row in table.one_run:
        ranges = []
        for g, data in results.items():
            seeds = data["outcomes"].get(row)
            if seeds:
                ranges.append(f"{g}: " + ", ".join(
                    f"{table.figures[f][0]} {_range(one_run_interval([s[f] for s in seeds]), table.figures[f][1])}"
                    for f in table.figures if all(f in s for s in seeds)) + f" (from {len(seeds)} training seeds)")
        if ranges:
            lines += ["", f"Where one more run of {table.label(row)} lands — yours, on another machine: 95 % of "
                      "single runs (a recorded training seed drawn, then its images) fall in " + "; ".join(ranges) + "."]
    baseline = next(iter(results.values()))["baseline"]
    for title, pairs in table.differences(rows, baseline):
        if not pairs:
            continue
        lines += ["", f"| {title} | {header}", rule]
        for a, b in pairs:
            values = []
            for g, f in columns:
                diff = paired(results[g]["outcomes"], a, b, f)
                values.append("–" if diff is None else diff.text(table.figures[f][1], signed=True))
            label = table.label(a) if b == baseline and title.startswith("difference from") else \
                f"{table.label(a)} − {table.label(b)}"
            lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _range(interval, digits: int) -> str:
    return f"{interval.low:.{digits}f}–{interval.high:.{digits}f}"


def comparisons(benchmark: str, results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """Every paired difference the tables show: (title of its group, row, minus row)."""
    rows = _rows(benchmark, results)
    baseline = next(iter(results.values()))["baseline"]
    return [(title, a, b) for title, pairs in TABLES[benchmark].differences(rows, baseline) for a, b in pairs]


def plot_differences(benchmark: str, results: dict[str, dict], path: Path) -> None:
    """A forest plot of the paired differences: one panel per figure, a line per comparison and generator, its 95 %
    interval as a bar; a bar that crosses the dashed zero line is no evidence of a difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = TABLES[benchmark]
    pairs = comparisons(benchmark, results)
    fig, axes = plt.subplots(1, len(table.figures), figsize=(3.4 * len(table.figures) + 2.4, 0.45 * len(pairs) + 1.6),
                             sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, figure in zip(axes[0], table.figures):
        for j, (gen, data) in enumerate(results.items()):
            for i, (_, a, b) in enumerate(pairs):
                diff = paired(data["outcomes"], a, b, figure)
                if diff is None:
                    continue
                y = i + (j - (len(results) - 1) / 2) * 0.25
                ax.errorbar(diff.mean, y, xerr=[[diff.mean - diff.low], [diff.high - diff.mean]], fmt="o", ms=4,
                            color=colours[j % len(colours)], label=gen if i == 0 else None,
                            alpha=1.0 if diff.excludes_zero else 0.45)
        ax.axvline(0, color="grey", ls="--", lw=1)
        ax.set_title(f"{table.figures[figure][0]}: difference")
        ax.grid(axis="x", alpha=0.3)
    labels = [f"{a} − {b}" for _, a, b in pairs]  # the short row names: the README's tables give the long ones
    axes[0][0].set_yticks(range(len(pairs)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def render_readme(text: str, benchmark: str, block: str) -> str:
    start, end = f"<!-- generated: {benchmark} -->", f"<!-- end generated: {benchmark} -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def take_in(path: Path) -> Path:
    data = json.loads(path.read_text())
    benchmark, base = data.get("benchmark", "methods"), data["base"]
    if benchmark not in TABLES:
        raise SystemExit(f"{path}: unknown benchmark {benchmark!r}; known: {', '.join(TABLES)}")
    target = RESULTS / f"{benchmark}-{GENERATORS.get(base, base.replace(':', '-'))}.json"
    shutil.copyfile(path, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", type=Path, help="result files to take into docs/results first")
    parser.add_argument("--check", action="store_true", help="exit 1 if a README block is not up to date")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path in args.json:
        print(f"{path} -> {take_in(path).relative_to(ROOT)}")
    text = updated = README.read_text()
    for benchmark in TABLES:
        results = load_results(benchmark)
        if results:
            updated = render_readme(updated, benchmark, render(benchmark, results))
            if not args.check:
                plot_differences(benchmark, results, ROOT / "docs" / f"toyworld-{benchmark}-differences.png")
    if args.check:
        if updated != text:
            print("README.md's toy-world tables differ from docs/results: run python benchmarks/readme_tables.py")
            return 1
        return 0
    README.write_text(updated)
    print("README.md: tables rewritten from " + ", ".join(p.name for p in sorted(RESULTS.glob("*.json"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
