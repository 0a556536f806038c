"""The README documents every config key and shows the three commands CI runs."""

from conftest import ROOT
from t2i_personal.config import config_reference_markdown


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config_reference_markdown() in readme, "regenerate the reference: python -m t2i_personal.config"


def test_readme_top_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ['pip install -e ".[dev]"', "accelerate launch train/train.py --config configs/quickstart.yaml",
                     "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert block[0] in ci and block[2] in ci


def test_readme_names_only_files_that_exist():
    import re

    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\b((?:configs|benchmarks|docs|eval|train)/[\w./-]+\.(?:yaml|py|png|md))", readme))
    assert {"configs/quickstart_face.yaml", "benchmarks/freecure_cost.py", "docs/freecure-toy-face.png"} <= named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README names files that do not exist: {missing}"


def test_readme_toy_world_tables_are_the_recorded_results():
    """The toy-world tables (methods, StyleForge, FreeCure) are written by benchmarks/readme_tables.py from
    docs/results/*.json (every image's outcome, recomputable): editing a table by hand, or recording results without
    regenerating it, fails here, and so does a file whose intervals are not what its outcomes give."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import readme_tables

    from t2i_personal.evaluation.intervals import bootstrap_interval

    assert readme_tables.main(["--check"]) == 0
    files = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert {"methods", "style", "freecure"} <= {p.name.split("-")[0] for p in files} <= set(readme_tables.TABLES)
    for path in files:
        data = json.loads(path.read_text())
        for row, seeds in data["outcomes"].items():
            assert len(seeds) == data.get("run_seeds", {}).get(row, data["train_seeds"]), (path.name, row)
            for figure, stats in data["summary"][row].items():
                if figure in ("difference", "one_run"):
                    continue
                assert bootstrap_interval([o[figure] for o in seeds]).as_dict() == stats, (path.name, row, figure)
