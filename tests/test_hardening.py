"""What a hostile or careless user cannot break: nobody's folder is overwritten, the same seed gives the same
image, pickles load only when the caller says so, and damaged inputs fail early with the file named."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PYTHON, ROOT, base_config, python_subprocess_env, run_training
from t2i_personal.config import load_config
from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.inference.pipeline import load_personalized
from t2i_personal.models.loading import load_components
from t2i_personal.training import run_folder

LORA = {"name": "dreambooth", "adapter": "lora", "lora": {"rank": 4, "dropout": 0.3}}


def lora_config(concept_dir, out, **training):
    return base_config(concept_dir, out, method=LORA,
                       training={"max_train_steps": 2, "checkpointing_steps": 1, **training})


@pytest.fixture(scope="module")
def lora_result(tmp_path_factory):
    """A finished 2-step LoRA result (dropout 0.3) with checkpoints at steps 1 and 2."""
    from t2i_personal.data.examples import write_examples

    root = tmp_path_factory.mktemp("hardening")
    write_examples(root / "dog", count=3, size=48)
    run_training(lora_config(root / "dog", root / "result"))
    return root / "result"


def copy_of(result: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(result, tmp_path / "copy"))


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ 1. no data loss


def test_a_users_folder_is_never_written_into(concept_dir, tmp_path):
    mine = tmp_path / "mine"
    (mine / "logs").mkdir(parents=True)
    (mine / "config.yaml").write_text("my own settings\n")
    (mine / "logs" / "notes.txt").write_text("my notes\n")
    before = tree(mine)
    with pytest.raises(ConfigError, match="not a t2i-personal run") as info:
        run_training(lora_config(concept_dir, mine))
    assert "config.yaml" in str(info.value) and str(mine / "run") in str(info.value)
    assert tree(mine) == before


def test_an_empty_output_dir_would_be_the_current_directory(concept_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="training.output_dir is empty"):
        run_training(lora_config(concept_dir, ""))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_run_starts_in_an_empty_folder_and_marks_it(concept_dir, tmp_path):
    (tmp_path / "out").mkdir()
    run_training(lora_config(concept_dir, tmp_path / "out", max_train_steps=1))
    assert (tmp_path / "out" / run_folder.MARKER_NAME).is_file()
    assert (tmp_path / "out" / "personalization.json").is_file()


@pytest.mark.slow
def test_an_unfinished_run_with_checkpoints_is_continued_not_restarted_over(concept_dir, tmp_path):
    cfg = lora_config(concept_dir, tmp_path / "out", max_train_steps=3, stop_after_step=1)
    run_training(cfg)
    with pytest.raises(ConfigError, match="training.resume=latest"):
        run_training(cfg)
    cfg["training"].update(stop_after_step=None, resume="latest")
    run_training(cfg)
    assert json.loads((tmp_path / "out" / "personalization.json").read_text())["steps"] == 3


def test_a_second_training_in_the_same_folder_is_refused_while_one_runs(tmp_path):
    held = run_folder.claim(tmp_path / "out")
    try:
        with pytest.raises(ConfigError, match="another training is running"):
            run_folder.claim(tmp_path / "out")
    finally:
        run_folder.release(held)
    run_folder.release(run_folder.claim(tmp_path / "out"))  # free again once the first one ends


# ------------------------------------------------------------------------------------------------ 2. same seed, same image


def test_every_loaded_model_is_in_eval_mode():
    comps = load_components("builtin:tiny-sd")
    for module in (comps.unet, comps.vae, comps.text_encoder):
        assert not any(m.training for m in module.modules())


def test_same_seed_twice_gives_the_same_image_with_lora_dropout(lora_result):
    pipe = load_personalized(lora_result)
    assert not any(m.training for m in pipe.unet.modules())

    def image():
        return pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(7), output_type="np").images[0]

    first = image()
    assert np.array_equal(first, image())
    assert np.array_equal(first, load_personalized(lora_result)("a photo of sks dog", num_inference_steps=2,
                          guidance_scale=3.0, height=32, width=32, generator=torch.Generator().manual_seed(7),
                          output_type="np").images[0])


# ------------------------------------------------------------------------------------------------ 3. pickles and paths


def test_a_pickle_lora_loads_only_when_the_caller_allows_it(lora_result, tmp_path):
    result = copy_of(lora_result, tmp_path)
    state = load_file(str(result / "pytorch_lora_weights.safetensors"))
    torch.save(state, result / "pytorch_lora_weights.bin")
    record = json.loads((result / "personalization.json").read_text())
    record["artifact"]["path"] = "pytorch_lora_weights.bin"
    (result / "personalization.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match=r"pickle weights \(pytorch_lora_weights.bin\).*allow_pickle=True"):
        load_personalized(result)
    assert load_personalized(result, allow_pickle=True) is not None


def test_the_records_own_allow_pickle_is_ignored(lora_result, tmp_path):
    base = tmp_path / "pickled-base"
    load_components("builtin:tiny-sd").pipeline().save_pretrained(base, safe_serialization=False)
    result = copy_of(lora_result, tmp_path)
    record = json.loads((result / "personalization.json").read_text())
    record["base_model"].update(pretrained=str(base), allow_pickle=True)
    (result / "personalization.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_personalized(result)


@pytest.mark.parametrize("path", ["../other/x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_artifact_paths_stay_inside_the_result_folder(lora_result, tmp_path, path):
    result = copy_of(lora_result, tmp_path)
    record = json.loads((result / "personalization.json").read_text())
    record["artifact"]["path"] = path
    (result / "personalization.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="outside the result folder"):
        load_personalized(result)


# ------------------------------------------------------------------------------------------------ 4. early, named failures


@pytest.mark.parametrize("case", ["file", "under_file", "unwritable"])
def test_an_impossible_output_dir_fails_before_any_work(concept_dir, tmp_path, case):
    (tmp_path / "a-file").write_text("x")
    out = {"file": tmp_path / "a-file", "under_file": tmp_path / "a-file" / "out",
           "unwritable": Path("/proc/t2i-personal-test/out")}[case]
    cfg = lora_config(concept_dir, out)
    cfg["method"]["prior"] = "class_images"
    cfg["concepts"][0]["class_dir"] = str(tmp_path / "class-images")
    message = {"file": "is a file", "under_file": "lies under .*a-file, which is a file",
               "unwritable": "cannot be written"}[case]
    with pytest.raises(ConfigError, match=message):
        run_training(cfg)
    assert not (tmp_path / "class-images").exists()  # refused before the model made any class image


def test_an_identifier_that_is_already_a_word_fails_before_class_images(concept_dir, tmp_path):
    cfg = lora_config(concept_dir, tmp_path / "out")
    cfg["method"]["prior"] = "class_images"
    cfg["concepts"][0].update(initializer_token="dog", class_dir=str(tmp_path / "class-images"))
    with pytest.raises(ConfigError, match="'sks' is already a word"):
        run_training(cfg)
    assert not (tmp_path / "class-images").exists() and not (tmp_path / "out").exists()


def _edit_record(result: Path, edit) -> None:
    path = result / "personalization.json"
    path.write_text(edit(path.read_text()))


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "cannot be read as JSON"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "artifact"}), "no 'artifact'"),
    (lambda text: "[1, 2]", "not a JSON object"),
])
def test_a_damaged_record_is_named(lora_result, tmp_path, damage, message):
    result = copy_of(lora_result, tmp_path)
    _edit_record(result, damage)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_personalized(result)
    assert "personalization.json" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape"])
def test_a_damaged_lora_is_named(lora_result, tmp_path, damage):
    result = copy_of(lora_result, tmp_path)
    weights = result / "pytorch_lora_weights.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        save_file({k: torch.zeros(v.shape[0] + 3, *v.shape[1:]) for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(ModelLoadError, match="could not be applied") as info:
        load_personalized(result)
    assert "pytorch_lora_weights.safetensors" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["trainable", "optimizer", "state"])
def test_a_damaged_latest_checkpoint_names_itself_and_an_earlier_one(lora_result, concept_dir, tmp_path, damage):
    cfg = lora_config(concept_dir, tmp_path / "out", max_train_steps=3, stop_after_step=2)
    run_training(cfg)
    latest = tmp_path / "out" / "checkpoints" / "checkpoint-000002"
    victim = {"trainable": latest / "trainable.safetensors", "optimizer": latest / "optimizer.bin",
              "state": latest / "trainer_state.json"}[damage]
    victim.write_bytes(victim.read_bytes()[:100])
    cfg["training"].update(stop_after_step=None, resume="latest")
    with pytest.raises(ConfigError, match="checkpoint-000002 is damaged") as info:
        run_training(cfg)
    earlier = tmp_path / "out" / "checkpoints" / "checkpoint-000001"
    assert f"training.resume={earlier}" in str(info.value)
    cfg["training"]["resume"] = str(earlier)  # the way out the message names works
    run_training(cfg)


# ------------------------------------------------------------------------------------------------ 5. leftovers


@pytest.mark.slow
def test_interrupted_writes_are_cleaned_and_an_empty_resume_is_announced(concept_dir, tmp_path, caplog):
    cfg = lora_config(concept_dir, tmp_path / "out", max_train_steps=3, stop_after_step=1)
    run_training(cfg)
    stale = [tmp_path / "out" / "checkpoints" / ".tmp-checkpoint-000002-abc", tmp_path / "out" / ".final-xyz"]
    for folder in stale:
        folder.mkdir()
        (folder / "optimizer.bin").write_bytes(b"0" * 1000)
    cfg["training"].update(stop_after_step=None, resume="latest")
    run_training(cfg)
    assert not any(p.exists() for p in stale)

    fresh = lora_config(concept_dir, tmp_path / "fresh", max_train_steps=1, resume="latest")
    with caplog.at_level(logging.WARNING):
        run_training(fresh)
    assert "holds no complete checkpoint; starting from step 0" in caplog.text


# ------------------------------------------------------------------------------------------------ 7. small ones


@pytest.mark.parametrize("override", ["training.max_train_steps=true", "training.learning_rate=true",
                                      "validation.guidance_scale=false"])
def test_booleans_are_not_numbers(override):
    with pytest.raises(ConfigError, match="expects a number, not the boolean"):
        load_config(ROOT / "configs" / "quickstart.yaml", [override])


def test_a_config_folder_is_named_as_a_folder():
    with pytest.raises(ConfigError, match=r"is a folder; give one YAML file, e.g. .*\.yaml"):
        load_config(ROOT / "configs")


def test_the_over_limit_image_hint_names_the_real_key(tmp_path):
    from PIL import Image

    from t2i_personal.data.images import ImageLoadError, load_image_rgb

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match=r"raise data\.max_image_pixels"):
        load_image_rgb(tmp_path / "big.png", max_pixels=50)


def test_the_finished_run_error_suggests_a_checkpoint_that_exists(lora_result, concept_dir):
    with pytest.raises(ConfigError, match="finished run") as info:
        run_training(lora_config(concept_dir, lora_result))
    suggested = str(info.value).split("training.resume=")[1].rstrip(".")
    assert Path(suggested).is_dir() and Path(suggested).parent == lora_result / "checkpoints"


def test_the_cli_says_what_is_wrong_without_a_traceback(concept_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    r = subprocess.run([PYTHON, str(ROOT / "train" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
                        f"training.output_dir={tmp_path / 'a-file'}"],
                       env=python_subprocess_env(), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr
