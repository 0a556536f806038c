"""eval/evaluate.py and t2i_personal.evaluation: generation (resumable), metrics, results.csv/summary.json/report.html."""

import csv
import json
import math
import subprocess

import pytest
from conftest import PYTHON, ROOT, base_config, python_subprocess_env, run_training

from t2i_personal.errors import ConfigError

PROMPTS = "a photo of {V} {C} in the jungle\na {V} {C} on the beach\n"


@pytest.fixture(scope="module")
def trained(concept_dir, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("result") / "tiny-dog"
    run_training(base_config(concept_dir, out, training={"max_train_steps": 2}, export={}))
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def _cfg(model, prompts, out, **kw):
    from t2i_personal.evaluation import EvalConfig, GenerationOptions, MetricOptions

    return EvalConfig(models=[str(model)] if model else [], prompts=str(prompts), images_per_prompt=2, seed=0,
                      metrics="clip_t,clip_i,ti_clip", out=str(out),
                      generation=GenerationOptions(steps=2, guidance=2.0, device="cpu"),
                      metric_options=MetricOptions(clip_model="builtin:toy-clip", batch_size=4),
                      progress=False, **kw)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_end_to_end_resume_and_images_mode(trained, prompt_file, tmp_path, one_torch_thread):
    from t2i_personal.evaluation import evaluate

    out = tmp_path / "eval"
    summary = evaluate(_cfg(trained, prompt_file, out))
    model = "tiny-dog"
    pngs = sorted((out / model).glob("*/*.png"))
    assert [p.relative_to(out / model).as_posix() for p in pngs] == [
        "000-a-photo-of-sks-dog-in-the-jungle/0.png", "000-a-photo-of-sks-dog-in-the-jungle/1.png",
        "001-a-sks-dog-on-the-beach/0.png", "001-a-sks-dog-on-the-beach/1.png"]
    for name in ("results.csv", "summary.json", "report.html"):
        assert (out / name).is_file()

    rows = _read_csv(out / "results.csv")
    assert len(rows) == 4
    assert [int(r["seed"]) for r in rows] == [0, 1, 2, 3]
    metrics = ("clip_t", "clip_i", "ti_clip")
    for r in rows:
        assert r["model"] == model and (out / r["path"]).is_file()
        for m in metrics:
            assert math.isfinite(float(r[m])) and -1.0 <= float(r[m]) <= 1.0

    data = json.loads((out / "summary.json").read_text())
    assert data == json.loads(json.dumps(summary))  # what evaluate returned is what was written (NaN aside)
    for m in metrics:
        overall = data["models"][model]["overall"][m]
        assert overall["mean"] == pytest.approx(sum(float(r[m]) for r in rows) / 4, abs=1e-12)
        assert overall["n"] == 4 and overall["ci95_low"] <= overall["mean"] <= overall["ci95_high"]
        for p in (0, 1):
            per = data["models"][model]["per_prompt"][p]["metrics"][m]
            vals = [float(r[m]) for r in rows if int(r["prompt_index"]) == p]
            assert per["mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-12)
        assert data["metrics"][m]["scale"] == "raw cosine" and data["metrics"][m]["backbone"]
    assert "normal approximation" in data["confidence_interval"]

    report = (out / "report.html").read_text()
    for text in ("a photo of sks dog in the jungle", "a sks dog on the beach"):
        assert text in report
    grids = sorted((out / "report" / "grids" / model).glob("*.png"))
    assert len(grids) == 2 and all(g.relative_to(out).as_posix() in report for g in grids)
    for m in metrics:
        assert (out / "report" / f"chart-{m}.png").is_file() and f"report/chart-{m}.png" in report

    # an interrupted run: one image missing -> only it is rendered again, and the results are the same
    missing = pngs[1]
    before = missing.read_bytes()
    missing.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in pngs if p != missing}
    csv_before = (out / "results.csv").read_text()
    evaluate(_cfg(trained, prompt_file, out))
    assert missing.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in pngs if p != missing} == mtimes
    assert (out / "results.csv").read_text() == csv_before

    # --images mode: score the generated folder without a model (concept and references given)
    out2 = tmp_path / "eval-images"
    cfg = _cfg(None, prompt_file, out2, images=[str(out / model)], concepts=["sks:dog"],
               references=[str(json.loads((trained / "personalization.json").read_text())
                                ["config"]["concepts"][0]["instance_dir"])])
    summary2 = evaluate(cfg)
    rows2 = _read_csv(out2 / "results.csv")
    assert len(rows2) == 4 and rows2[0]["seed"] == "" and not (out2 / model).exists()  # nothing generated
    for m in metrics:
        assert summary2["models"][model]["overall"][m]["mean"] == pytest.approx(
            data["models"][model]["overall"][m]["mean"], abs=1e-6)


def test_images_mode_with_dino(concept_dir, prompt_file, tmp_path):
    """--images on a hand-made folder (no model, no generation) with dino_i from a tiny local transformers ViT."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    from t2i_personal.evaluation import evaluate

    vit_dir = tmp_path / "tiny-vit"
    ViTModel(ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(vit_dir)
    rng = np.random.default_rng(0)
    images = tmp_path / "mine"
    for folder, count in (("000-a-photo-of-sks-dog-in-the-jungle", 3), ("001-a-sks-dog-on-the-beach", 1)):
        for k in range(count):
            (images / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / folder / f"{k}.png")
    cfg = _cfg(None, prompt_file, tmp_path / "out", images=[str(images)], concepts=["sks:dog"],
               references=[str(concept_dir)])
    cfg.metrics = "dino_i,clip_t"
    cfg.metric_options.dino_model = str(vit_dir)
    summary = evaluate(cfg)
    rows = _read_csv(tmp_path / "out" / "results.csv")
    assert [r["prompt_index"] for r in rows] == ["0", "0", "0", "1"]
    assert all(math.isfinite(float(r["dino_i"])) for r in rows)
    assert summary["metrics"]["dino_i"]["metric"] == "DINO-I"
    per_prompt = summary["models"]["mine"]["per_prompt"]
    assert per_prompt[1]["metrics"]["dino_i"]["ci95_low"] is None  # one image: no interval

    (images / "005-something-else").mkdir()
    with pytest.raises(ConfigError, match="prompt index 5"):
        evaluate(cfg)


def test_clear_errors(trained, prompt_file, tmp_path):
    from t2i_personal.evaluation import parse_metric_names, prepare

    with pytest.raises(ConfigError, match="Did you mean 'clip_t'"):
        parse_metric_names("clip_t,clipt")
    with pytest.raises(ConfigError, match="not a t2i-personal result"):
        prepare(_cfg(tmp_path, prompt_file, tmp_path / "o"))
    with pytest.raises(ConfigError, match="no such folder"):
        prepare(_cfg(tmp_path / "nope", prompt_file, tmp_path / "o"))
    cfg = _cfg(trained, prompt_file, tmp_path / "o")
    cfg.metrics = "dino_i"
    with pytest.raises(ConfigError, match="--dino-model"):
        prepare(cfg)
    with pytest.raises(ConfigError, match="--concept"):
        prepare(_cfg(None, prompt_file, tmp_path / "o", images=[str(tmp_path)]))


def test_registry_is_extensible():
    from t2i_personal.evaluation import METRICS, parse_metric_names, register_metric

    register_metric("my_metric", lambda o: None, "class_prompt")
    try:
        assert parse_metric_names("my-metric,clip_t") == ["my_metric", "clip_t"]
    finally:
        del METRICS["my_metric"]
    assert {"clip_t", "clip_i", "ti_clip", "dino_i"} <= set(METRICS)


def test_cli_subprocess(trained, prompt_file, tmp_path):
    out = tmp_path / "cli"
    cmd = [PYTHON, str(ROOT / "eval" / "evaluate.py"), "--model", str(trained), "--prompts", str(prompt_file),
           "--images-per-prompt", "1", "--steps", "1", "--metrics", "clip_t,ti_clip", "--out", str(out),
           "--device", "cpu", "--no-progress"]
    env = {**python_subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tiny-dog: 2 images" in proc.stdout
    assert len(_read_csv(out / "results.csv")) == 2 and (out / "report.html").is_file()


def test_cli_error_exit_code(trained, prompt_file, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "eval" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--model", str(trained), "--prompts", str(prompt_file), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert cli.main(args + ["--metrics", "clip_x"]) == 2
    assert "Unknown metric 'clip_x'. Did you mean 'clip_t'?" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path), "--prompts", str(prompt_file), "--device", "cpu"]) == 2
    assert "not a t2i-personal result" in capsys.readouterr().err


def test_blip2_t_is_registered_and_names_its_model_when_missing_offline(monkeypatch, tmp_path):
    from t2i_personal.errors import ModelLoadError
    from t2i_personal.evaluation import METRICS, MetricOptions, build_metrics

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached: the offline error must show
    assert "blip2_t" in METRICS and "BLIP" in METRICS["blip2_t"].description
    with pytest.raises(ModelLoadError, match="blip-itm-large-coco"):
        build_metrics(["blip2_t"], MetricOptions())


# ------------------------------------------------------------------------------------------ CP-CLIP and FID/KID


def _image_folder(root, counts=(("000-a-photo-of-sks-dog-in-the-jungle", 3), ("001-a-sks-dog-on-the-beach", 2)),
                  size=40, seed=0):
    """A hand-made --images folder in the evaluator's layout (random pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for folder, count in counts:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / folder / f"{k}.png")
    return root


class _FakeDetector:
    """Finds every query in a box: its left half for the first query, its right half for the second, ..."""

    def __init__(self, score=0.9):
        self.score, self.calls = score, []

    def __call__(self, image, queries, threshold):
        import torch

        self.calls.append((tuple(queries), threshold))
        w, h = image.size
        step = w / max(1, len(queries))
        boxes = [[i * step, 0.0, (i + 1) * step, float(h)] for i in range(len(queries))]
        return {"boxes": torch.tensor(boxes), "scores": torch.full((len(queries),), self.score),
                "labels": torch.arange(len(queries))}


def test_cp_clip_through_the_engine(concept_dir, prompt_file, tmp_path, monkeypatch, one_torch_thread):
    from t2i_personal.evaluation import evaluate, registry

    images = _image_folder(tmp_path / "mine")
    detector = _FakeDetector()
    loaded = []

    def fake_load(source, device="cpu", allow_pickle=False):
        loaded.append(source)
        return detector

    monkeypatch.setattr(registry, "load_detector", fake_load)
    cfg = _cfg(None, prompt_file, tmp_path / "out", images=[str(images)], concepts=["sks:dog"],
               references=[str(concept_dir)])
    cfg.metrics = "cp_clip,clip_i"
    cfg.metric_options.detection_threshold = 0.25
    summary = evaluate(cfg)
    assert loaded == ["google/owlvit-base-patch32"]  # the default detector source, loaded once
    assert detector.calls and all(c == (("dog",), 0.25) for c in detector.calls)
    rows = _read_csv(tmp_path / "out" / "results.csv")
    assert list(rows[0]) == ["model", "prompt_index", "prompt", "seed", "path", "cp_clip", "cp_clip_detection_rate",
                             "clip_i"]
    assert len(rows) == 5
    for r in rows:
        assert math.isfinite(float(r["cp_clip"])) and -1.0 <= float(r["cp_clip"]) <= 1.0
        assert float(r["cp_clip_detection_rate"]) == 1.0
    overall = summary["models"]["mine"]["overall"]
    assert overall["cp_clip_detection_rate"]["mean"] == 1.0 and overall["cp_clip"]["n"] == 5
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["metrics"]["cp_clip"]["metric"] == "CP-CLIP" and data["metrics"]["cp_clip"]["threshold"] == 0.25
    assert "cp_clip_detection_rate" in (tmp_path / "out" / "report.html").read_text()

    # nothing detected (every box at or below the threshold): score 0, detection rate 0
    detector.score = 0.2
    evaluate(cfg)
    rows = _read_csv(tmp_path / "out" / "results.csv")
    assert all(float(r["cp_clip"]) == 0.0 and float(r["cp_clip_detection_rate"]) == 0.0 for r in rows)

    # an injected detector (no loading at all)
    loaded.clear()
    cfg.metric_options.detector = _FakeDetector()
    evaluate(cfg)
    assert not loaded and cfg.metric_options.detector.calls


def test_cp_clip_detector_offline_error_and_threshold(concept_dir, prompt_file, tmp_path, monkeypatch):
    from t2i_personal.errors import ModelLoadError
    from t2i_personal.evaluation import MetricOptions, build_metrics, prepare

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached: the offline error must show
    with pytest.raises(ModelLoadError, match="owlvit-base-patch32"):
        build_metrics(["cp_clip"], MetricOptions())
    cfg = _cfg(None, prompt_file, tmp_path / "o", images=[str(_image_folder(tmp_path / "mine"))],
               concepts=["sks:dog"], references=[str(concept_dir)])
    cfg.metrics = "cp_clip"
    cfg.metric_options.detection_threshold = 1.5
    with pytest.raises(ConfigError, match="--detection-threshold"):
        prepare(cfg)


def test_fid_kid_per_model(prompt_file, tmp_path, one_torch_thread):
    import shutil

    from t2i_personal.evaluation import evaluate

    images = _image_folder(tmp_path / "mine")
    other = _image_folder(tmp_path / "other", seed=1)
    same = tmp_path / "same-as-mine"  # the reference folder: mine's own images, flattened
    same.mkdir()
    for path in sorted(images.glob("*/*.png")):
        shutil.copy(path, same / f"{path.parent.name[:3]}-{path.name}")
    cfg = _cfg(None, prompt_file, tmp_path / "out", images=[str(images), str(other)], concepts=["sks:dog"],
               fid_reference=str(same))
    cfg.metrics = "clip_t"
    cfg.metric_options.fid_feature = "builtin:toy-clip"
    summary = evaluate(cfg)
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    for model in ("mine", "other"):
        fk = data["models"][model]["fid_kid"]
        assert fk == summary["models"][model]["fid_kid"]
        assert math.isfinite(fk["fid"]) and math.isfinite(fk["kid"]) and math.isfinite(fk["kid_std"])
        assert fk["kid_subset_size"] == 5 and fk["count_generated"] == 5 and fk["count_reference"] == 5
        assert "toy-clip" in fk["feature_extractor"] or "toy" in fk["feature_extractor"].lower()
    assert data["models"]["mine"]["fid_kid"]["fid"] == pytest.approx(0.0, abs=1e-3)  # a set against itself
    assert data["models"]["other"]["fid_kid"]["fid"] > 1e-2
    assert data["metrics"]["fid_kid"]["metric"] == "FID/KID" and data["settings"]["fid_reference"] == str(same)
    report = (tmp_path / "out" / "report.html").read_text()
    assert "FID" in report and "KID" in report
    assert f"{data['models']['mine']['fid_kid']['fid']:.4f}" in report
    assert f"{data['models']['other']['fid_kid']['fid']:.4f}" in report

    cfg.fid_reference = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="--fid-reference"):
        evaluate(cfg)


def test_cli_fid_options(prompt_file, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "eval" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    images = _image_folder(tmp_path / "mine")
    args = ["--images", str(images), "--concept", "sks:dog", "--prompts", str(prompt_file), "--out",
            str(tmp_path / "o"), "--device", "cpu", "--metrics", "clip_t", "--no-progress", "--fid-reference",
            str(images / "000-a-photo-of-sks-dog-in-the-jungle"), "--fid-feature", "builtin:toy-clip"]
    assert cli.main(args) == 0
    assert "fid " in capsys.readouterr().out
    parsed = cli.build_parser().parse_args(["--images", "x"])
    assert parsed.detector == "google/owlvit-base-patch32" and parsed.detection_threshold == 0.1
    assert parsed.fid_feature == "inception" and parsed.fid_reference is None


def test_fid_inception_offline_is_a_clear_early_error(prompt_file, tmp_path, monkeypatch):
    import torch

    from t2i_personal.errors import ModelLoadError
    from t2i_personal.evaluation import prepare

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-torch-hub"))
    images = _image_folder(tmp_path / "mine")
    cfg = _cfg(None, prompt_file, tmp_path / "o", images=[str(images)], concepts=["sks:dog"],
               fid_reference=str(images / "000-a-photo-of-sks-dog-in-the-jungle"))
    assert cfg.metric_options.fid_feature == "inception"
    with pytest.raises(ModelLoadError, match="--fid-feature builtin:toy-clip"):
        prepare(cfg)  # before anything is generated


def test_models_with_the_same_folder_name_get_distinct_names(tmp_path):
    from t2i_personal.evaluation import EvalConfig, prepare

    folders = [tmp_path / p for p in ("a/out", "b/out", "c/out-1")]
    for f in folders:
        f.mkdir(parents=True)
    sources, _, _ = prepare(EvalConfig(images=[str(f) for f in folders], concepts=["sks:dog"], metrics="clip_t"))
    names = [s.name for s in sources]
    assert len(set(names)) == 3, names


def test_resume_refuses_images_made_by_another_model_or_settings(tmp_path):
    from types import SimpleNamespace

    from t2i_personal.evaluation import EvalConfig, GenerationOptions
    from t2i_personal.evaluation.layout import GENERATION_RECORD
    from t2i_personal.evaluation.run import claim_generation_folders

    a, b = tmp_path / "runs" / "a" / "output", tmp_path / "runs" / "b" / "output"
    cfg = EvalConfig(models=[str(a)], prompts="p.txt", out=str(tmp_path / "eval"), generation=GenerationOptions(steps=5))
    claim_generation_folders([SimpleNamespace(name="output", model_dir=a, freecure=False)], tmp_path / "eval", cfg)
    assert (tmp_path / "eval" / "output" / GENERATION_RECORD).is_file()
    claim_generation_folders([SimpleNamespace(name="output", model_dir=a, freecure=False)], tmp_path / "eval", cfg)  # same: fine
    with pytest.raises(ConfigError, match="generated differently"):
        claim_generation_folders([SimpleNamespace(name="output", model_dir=b, freecure=False)], tmp_path / "eval", cfg)
    cfg.generation.steps = 10
    with pytest.raises(ConfigError, match="steps"):
        claim_generation_folders([SimpleNamespace(name="output", model_dir=a, freecure=False)], tmp_path / "eval", cfg)
