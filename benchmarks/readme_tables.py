"""Write the README's toy-world methods table from the benchmark's JSON, so the table is what was measured.

    python benchmarks/toyworld_methods.py [--base builtin:toy-flux]            # writes outputs/methods*/methods.json
    python benchmarks/readme_tables.py outputs/methods/methods.json outputs/methods-flux/methods.json
    python benchmarks/readme_tables.py --check                                 # README == docs/results (a test)

Each given ``methods.json`` is copied to ``docs/results/methods-<base>.json`` (its per-image outcomes included, so
anyone can recompute the intervals), then the README's block between ``<!-- generated: methods -->`` and
``<!-- end generated: methods -->`` is rewritten from every file in ``docs/results/``: one column group per
generator, the mean and 95 % interval of each figure, the paired difference from the baseline run (``~0``: its
interval contains 0), and per generator the command, training seeds, images per cell, date and commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from t2i_personal.evaluation.intervals import Interval  # noqa: E402
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
START, END = "<!-- generated: methods -->", "<!-- end generated: methods -->"
GENERATORS = {"builtin:toy": "toy-sd", "builtin:toy-flux": "toy-flux"}  # column order
FIGURES = {"subject": "subject", "scene": "scene", "drift": "drift"}
RUN_LABELS = {
    "dreambooth-lora": "DreamBooth-LoRA, `sks` (the quickstart)",
    "lora-token": "LoRA + learned `<new1>`",
    "lora-token-spl": "LoRA + `<new1>` + SPL (λ = 1)",
    "custom-diffusion": "Custom Diffusion + `<new1>`",
    "classdiffusion": "ClassDiffusion (Custom Diffusion + `<new1>` + SPL, λ = 1)",
    "classdiffusion-0.3": "ClassDiffusion, λ = 0.3",
    "classdiffusion-0.1": "ClassDiffusion, λ = 0.1",
    "diffusers-script": "diffusers' `train_dreambooth_lora.py`, its defaults",
}


def _cell(stats: dict | None, signed: bool = False) -> str:
    return "–" if stats is None else Interval(**stats).text(signed=signed)


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    """generator label -> methods.json, in :data:`GENERATORS` order."""
    found = {}
    for path in sorted(folder.glob("methods-*.json")):
        data = json.loads(path.read_text())
        found[GENERATORS.get(data["base"], data["base"])] = data
    order = list(GENERATORS.values())
    return dict(sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def methods_table(results: dict[str, dict]) -> str:
    """The markdown block: provenance lines, the figures table, the differences table."""
    if not results:
        raise SystemExit(f"no methods-*.json in {RESULTS}: run benchmarks/toyworld_methods.py and pass its JSON")
    gens = list(results)
    runs = []
    for data in results.values():
        runs += [r for r in data["summary"] if r not in runs]
    lines = []
    for gen, data in results.items():
        lines.append(f"- {gen}: `{data['command']}` — {data['train_seeds']} training seed(s) × "
                     f"{data['images_per_cell']} images per cell, {data['date']}, commit {data['commit']}")
    header = "| run | " + " | ".join(f"{FIGURES[f]} ({g})" for g in gens for f in FIGURES) + " |"
    rule = "|---|" + "---|" * (len(gens) * len(FIGURES))
    figures = [header, rule]
    differences = [header.replace("| run |", f"| difference from {RUN_LABELS.get(_baseline(results), '')} |"), rule]
    for run in runs:
        label = RUN_LABELS.get(run, run)
        cells = [_cell(results[g]["summary"].get(run, {}).get(f)) for g in gens for f in FIGURES]
        figures.append(f"| {label} | " + " | ".join(cells) + " |")
        if any("difference" in results[g]["summary"].get(run, {}) for g in gens):
            cells = [_cell(results[g]["summary"].get(run, {}).get("difference", {}).get(f), signed=True)
                     for g in gens for f in FIGURES]
            differences.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + figures + [""] + differences + [""] + spl_table(results))


SPL_PAIRS = {"lora-token-spl": "lora-token", "classdiffusion": "custom-diffusion"}  # with SPL -> the same without


def spl_table(results: dict[str, dict]) -> list[str]:
    """What SPL adds: each SPL run against the same run without it, paired, from the recorded outcomes."""
    from t2i_personal.evaluation.intervals import paired_difference

    gens = list(results)
    rows = []
    for with_spl, without in SPL_PAIRS.items():
        cells = []
        for g in gens:
            outcomes = results[g]["outcomes"]
            for f in FIGURES:
                if with_spl in outcomes and without in outcomes:
                    diff = paired_difference([o[f] for o in outcomes[with_spl]], [o[f] for o in outcomes[without]])
                    cells.append(diff.text(signed=True))
                else:
                    cells.append("–")
        rows.append(f"| {RUN_LABELS[with_spl]} − {RUN_LABELS[without]} | " + " | ".join(cells) + " |")
    header = "| what SPL adds (paired) | " + " | ".join(f"{FIGURES[f]} ({g})" for g in gens for f in FIGURES) + " |"
    return [header, "|---|" + "---|" * (len(gens) * len(FIGURES))] + rows


def _baseline(results: dict[str, dict]) -> str:
    return next(iter(results.values()))["baseline"]


def render_readme(text: str, block: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", type=Path, help="methods.json files to take into docs/results first")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's block is not up to date")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path in args.json:
        base = json.loads(path.read_text())["base"]
        shutil.copyfile(path, RESULTS / f"methods-{GENERATORS.get(base, base.replace(':', '-'))}.json")
    text = README.read_text()
    updated = render_readme(text, methods_table(load_results()))
    if args.check:
        if updated != text:
            print("README.md's methods table differs from docs/results: run python benchmarks/readme_tables.py")
            return 1
        return 0
    README.write_text(updated)
    print(f"README.md: methods table from {', '.join(p.name for p in sorted(RESULTS.glob('methods-*.json')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
