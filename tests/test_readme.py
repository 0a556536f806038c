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


def test_readme_methods_table_is_the_recorded_results():
    """The toy-world methods table is written by benchmarks/readme_tables.py from docs/results/*.json (every image's
    outcome, recomputable): editing the table by hand, or recording results without regenerating it, fails here."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import readme_tables

    from t2i_personal.evaluation.intervals import bootstrap_interval

    assert readme_tables.main(["--check"]) == 0
    for path in sorted((ROOT / "docs" / "results").glob("methods-*.json")):
        data = json.loads(path.read_text())
        for run, seeds in data["outcomes"].items():  # the intervals are what the recorded outcomes give
            assert len(seeds) == data["train_seeds"] and all(len(o["subject"]) == data["images_per_cell"]
                                                              for o in seeds)
            recomputed = bootstrap_interval([o["subject"] for o in seeds])
            assert recomputed.as_dict() == data["summary"][run]["subject"]
