"""Every bad input raises the documented error, names what is wrong, and leaves no complete-looking output."""

import subprocess

import pytest
import yaml
from PIL import Image

from conftest import PYTHON, ROOT, base_config, python_subprocess_env, run_training
from t2i_personal.config import load_config
from t2i_personal.data.images import ImageLoadError
from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.models.loading import load_components


def assert_not_complete(out):
    assert not (out / "personalization.json").exists()
    assert not (out.exists() and any(out.iterdir())), f"{out} should not have been written"


def test_folder_of_corrupt_images(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png at all")
    (bad / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageLoadError, match="a.png"):
        run_training(base_config(bad, tmp_path / "out"))
    assert_not_complete(tmp_path / "out")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="empty"):
        run_training(base_config(tmp_path / "empty", tmp_path / "out"))
    assert_not_complete(tmp_path / "out")


def test_missing_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="does not exist"):
        run_training(base_config(tmp_path / "nope", tmp_path / "out"))
    assert_not_complete(tmp_path / "out")


def test_odd_modes_and_one_corrupt_file_still_train(tmp_path):
    """RGBA, CMYK, 16-bit, palette and EXIF-rotated images are converted; the corrupt one is skipped with a warning."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGBA", (40, 48), (255, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("CMYK", (48, 40), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (40, 40), 40000).save(folder / "sixteen.png")
    Image.new("P", (40, 40), 3).save(folder / "palette.png")
    rotated = Image.new("RGB", (48, 32), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning, match="broken.png"):
        trainer = run_training(base_config(folder, tmp_path / "out", training={"max_train_steps": 1}))
    assert (tmp_path / "out" / "personalization.json").exists()
    assert trainer.last_logs["loss"] > 0


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'training\.learnig_rate'.*Did you mean 'learning_rate'"):
        load_config(None, ["training.learnig_rate=1e-4"], base={"concepts": [
            {"identifier": "sks", "class_noun": "dog", "instance_dir": "x"}]})


def test_cli_reports_config_errors_without_traceback(concept_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(concept_dir, tmp_path / "out")))
    r = subprocess.run([PYTHON, str(ROOT / "train" / "train.py"), "--config", str(cfg), "metod.adapter=lora"],
                       env=python_subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert "Did you mean 'method'" in r.stderr and "Traceback" not in r.stderr
    assert_not_complete(tmp_path / "out")


@pytest.mark.parametrize("overrides,message", [
    (["training.cache_text_embeddings=true", "method.train_text_encoder=true"], "cache_text_embeddings"),
    (["training.cache_latents=true", "data.center_crop=false"], "center_crop"),
    (["method.lora.rank=8"], "adapter is 'full'"),
    (["method.train_unet=false"], "nothing would train"),
    (["method.prior_loss_weight=0.5"], "prior is 'none'"),
    (["training.stop_after_step=10", "training.max_train_steps=5"], "stop_after_step"),
    (["data.resolution=100"], "multiple of 8"),
    (["training.text_encoder_learning_rate=1e-5"], "train_text_encoder is false"),
])
def test_contradictory_options(overrides, message):
    base = {"concepts": [{"identifier": "sks", "class_noun": "dog", "instance_dir": "x"}]}
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, base=base)


def test_unavailable_options_fail_before_writing(concept_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16.*needs a GPU"):
            run_training(base_config(concept_dir, tmp_path / "out", training={"mixed_precision": "fp16"}))
        assert_not_complete(tmp_path / "out")
    for key, value, package in [("attention", "xformers", "xformers"), ("optimizer", "adamw_8bit", "bitsandbytes")]:
        try:
            __import__(package)
            continue
        except ImportError:
            pass
        with pytest.raises(ConfigError, match=package):
            run_training(base_config(concept_dir, tmp_path / "out", training={key: value}))
        assert_not_complete(tmp_path / "out")


def test_prompt_longer_than_the_text_encoder(concept_dir, tmp_path):
    long = "a photo of {V} {C} " + "with a very long description " * 20
    cfg = base_config(concept_dir, tmp_path / "out")
    cfg["concepts"][0]["instance_prompt"] = long
    with pytest.raises(ConfigError, match="tokens long"):
        run_training(cfg)
    assert_not_complete(tmp_path / "out")


def test_finished_output_is_not_overwritten(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", training={"max_train_steps": 1})
    run_training(cfg)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_training(cfg)


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pickled"
    load_components("builtin:tiny-sd").pipeline().save_pretrained(folder, safe_serialization=False)
    assert list(folder.rglob("*.bin"))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_components(str(folder))
    comps = load_components(_model(str(folder), True))
    assert comps.family.name == "sd"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"whatever")
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_components(str(ckpt))


def _model(path, allow):
    from t2i_personal.config import ModelConfig

    return ModelConfig(pretrained=path, allow_pickle=allow)


def test_offline_hub_id_names_the_model_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_components("someone/some-model-that-is-not-cached")
    text = str(info.value)
    assert "someone/some-model-that-is-not-cached" in text and "HF_HUB_OFFLINE" in text
    assert "model.pretrained" in text and "huggingface-cli download" in text


def test_unrecognised_model_source():
    with pytest.raises(ModelLoadError, match="builtin:tiny-sd"):
        load_components("not a model")
    with pytest.raises(ModelLoadError, match="unknown built-in"):
        load_components("builtin:huge")


def test_lora_targets_that_match_nothing(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora",
                                                             "lora": {"unet_target_modules": ["no_such_layer"]}})
    with pytest.raises(ConfigError, match="unet_target_modules"):
        run_training(cfg)
    assert not (tmp_path / "out" / "personalization.json").exists()


def test_caption_with_an_unknown_placeholder_is_a_clean_cli_error(tmp_path):
    from t2i_personal.data.examples import write_examples

    folder = tmp_path / "captioned"
    write_examples(folder, count=2, size=40)
    (folder / "toy-dog-0.txt").write_text("a photo of {V} {C} with {hat}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(folder, tmp_path / "out")))
    r = subprocess.run([PYTHON, str(ROOT / "train" / "train.py"), "--config", str(cfg)],
                       env=python_subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "toy-dog-0.txt" in r.stderr and "{hat}" in r.stderr
    assert "Traceback" not in r.stderr
