"""What the toy-world benchmarks record (benchmarks/_results.py) and how the README's tables are written from it
(benchmarks/readme_tables.py): intervals and paired differences recomputed from every image's outcome."""

import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import _results  # noqa: E402
import readme_tables  # noqa: E402


def _style_result(seeds=3, n=40, plain_shift=0.0):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, size=n).tolist()
    styled = [(rng.uniform(0.5, 0.7, size=n)).tolist() for _ in range(seeds)]
    outcomes = {"StyleRef images": [{"palette": [1.0] * 6}] * seeds,
                "base model": [{"palette": base, "class": [1] * n}] * seeds,
                "tuned, style prompt": [{"palette": s, "class": [1, 0] * (n // 2)} for s in styled],
                "tuned, plain prompt": [{"palette": (np.array(s) - plain_shift).tolist(), "class": [1, 0] * (n // 2)}
                                        for s in styled]}
    return _results.record(benchmark="style", base="builtin:toy", script="benchmarks/toyworld_style.py", argv=[],
                           outcomes=outcomes, baseline="base model", train_seeds=seeds, images_per_cell=n)


def test_record_summarizes_every_figure_and_pairs_only_rows_shaped_alike():
    result = _style_result()
    summary = result["summary"]
    assert set(summary["tuned, style prompt"]) == {"palette", "class", "difference", "one_run"}
    assert summary["tuned, style prompt"]["difference"]["palette"]["low"] > 0.1  # styled clearly above the base
    assert "difference" not in summary["StyleRef images"]  # 6 reference images do not pair with 40 generations
    assert summary["StyleRef images"]["palette"]["mean"] == 1.0
    assert result["command"] == "python benchmarks/toyworld_style.py" and result["train_seeds"] == 3
    json.dumps(result)  # what the benchmark writes


def test_tables_print_no_difference_as_such_and_a_real_one_signed(tmp_path):
    leak = readme_tables.render("style", {"toy-sd": _style_result(plain_shift=0.0)})
    kept = readme_tables.render("style", {"toy-sd": _style_result(plain_shift=0.3)})
    pair = "| tuned, `zwx style` prompt − tuned, plain prompt |"
    leak_row = next(line for line in leak.splitlines() if line.startswith(pair))
    kept_row = next(line for line in kept.splitlines() if line.startswith(pair))
    assert "+0.00 [+0.00, +0.00] ~0" in leak_row  # the trigger word adds nothing: the style leaks completely
    assert "+0.30 [+0.30, +0.30] |" in kept_row and "~0 |" in kept_row  # palette differs; class read does not
    assert "3 training seed(s) × 40 images per cell" in leak
    assert "| StyleRef images | 1.00 [1.00, 1.00] | – |" in leak


def test_methods_table_lists_what_spl_adds_and_where_one_more_quickstart_lands():
    outcomes = {run: [{"subject": [1, 0] * 8, "scene": [1] * 16, "drift": [0] * 16}] * 2
                for run in ("dreambooth-lora", "custom-diffusion", "classdiffusion", "classdiffusion-0.1")}
    outcomes["dreambooth-lora"] = outcomes["dreambooth-lora"] + [{"subject": [1] * 16, "scene": [1] * 16,
                                                                  "drift": [0] * 16}]  # a third seed: pairs on two
    result = _results.record(benchmark="methods", base="builtin:toy-flux", script="x.py", argv=[],
                             outcomes=outcomes, baseline="dreambooth-lora", train_seeds=2, images_per_cell=16)
    table = readme_tables.render("methods", {"toy-flux": result})
    assert "| what SPL adds (paired) |" in table
    assert "| ClassDiffusion, λ = 0.1 − Custom Diffusion + `<new1>` |" in table
    assert "| ClassDiffusion (Custom Diffusion + `<new1>` + SPL, λ = 1) − Custom Diffusion + `<new1>` |" in table
    assert "| Custom Diffusion + `<new1>` | +0.00 [+0.00, +0.00] ~0 |" in table  # paired on the two shared seeds
    assert "fall in toy-flux: subject 0.31–1.00" in table and "(from 3 training seeds)" in table


def test_take_in_refuses_an_unknown_benchmark(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"benchmark": "speed", "base": "builtin:toy"}))
    with pytest.raises(SystemExit, match="unknown benchmark 'speed'"):
        readme_tables.take_in(path)


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["style", "freecure"])
def test_toy_benchmark_records_every_image_and_feeds_its_table(benchmark, tmp_path):
    """The StyleForge and FreeCure benchmarks train (2 steps here), read every image, write their result file and
    the README table can be written from it."""
    import importlib

    module = importlib.import_module(f"toyworld_{benchmark}")
    extra = ["--steps", "4"] if benchmark == "freecure" else []
    assert module.main(["--quick", "--out", str(tmp_path), *extra, "training.max_train_steps=2"]) == 0
    data = json.loads((tmp_path / f"{benchmark}.json").read_text())
    assert data["benchmark"] == benchmark and data["train_seeds"] == 1
    assert (tmp_path / "train" / "seed-0" / "personalization.json").exists()
    figure = {"style": "palette", "freecure": "hair"}[benchmark]
    tuned = {"style": "tuned, style prompt", "freecure": "personalized"}[benchmark]
    assert len(data["outcomes"][tuned][0][figure]) == data["images_per_cell"] > 0
    table = readme_tables.render(benchmark, {"toy-sd": data})
    assert table.count("\n|---|") >= 2  # the figures and the paired differences


def test_a_reading_is_reused_until_the_run_is_trained_again(tmp_path, monkeypatch):
    import os

    import toyworld_methods

    calls = []

    def fake_evaluate(out, images_per_scene):
        calls.append(out)
        outcomes = {"subject": [len(calls) % 2] * 8, "scene": [1] * 8, "drift": [0] * 8}
        return {**{k: float(np.mean(v)) for k, v in outcomes.items()}, "outcomes": outcomes}, \
            np.full((16, 4, 4, 3), len(calls), np.uint8)

    monkeypatch.setattr(toyworld_methods, "evaluate", fake_evaluate)
    run = tmp_path / "seed-0"
    run.mkdir()
    (run / "personalization.json").write_text("{}")
    first, images = toyworld_methods.evaluate_or_reuse(run, 1)
    again, images_again = toyworld_methods.evaluate_or_reuse(run, 1)
    assert len(calls) == 1 and again == first and (images_again == images).all()
    assert toyworld_methods.evaluate_or_reuse(run, 2)[0]["subject"] == 0.0 and len(calls) == 2  # other image count
    later = (run / "reading-1.npz").stat().st_mtime + 10
    os.utime(run / "personalization.json", (later, later))  # retrained since it was read
    assert toyworld_methods.evaluate_or_reuse(run, 1)[0]["subject"] == 1.0 and len(calls) == 3
    toyworld_methods.evaluate_or_reuse(run, 1, reread=True)
    assert len(calls) == 4


def test_a_finished_folder_trained_with_other_settings_is_not_reused(tmp_path):
    import yaml

    import toyworld_methods
    from t2i_personal.config import load_config

    out = tmp_path / "dreambooth-lora" / "seed-0"
    out.mkdir(parents=True)
    old = load_config(ROOT / "configs" / "quickstart.yaml", [
        "training.max_train_steps=123", f"training.output_dir={out}", "training.seed=0", "training.report_to=none",
        "validation.prompts=[]", "training.progress_bar=false"])  # what train_preset sets
    (out / "config.yaml").write_text(yaml.safe_dump(old.model_dump(mode="json")))
    (out / "personalization.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"training.max_train_steps: 123 -> 600"):
        toyworld_methods.train_or_reuse("dreambooth-lora", tmp_path)
    assert toyworld_methods.train_preset("configs/quickstart.yaml", out, "builtin:toy", 0,
                                         ["training.max_train_steps=123"]) == out  # same settings: reused
