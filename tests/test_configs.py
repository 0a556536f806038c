"""Every shipped preset validates, and the quickstart's data exists on a fresh checkout."""


import pytest

from conftest import ROOT
from t2i_personal.config import load_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "dreambooth.yaml", "dreambooth_lora.yaml", "dreambooth_lora_sdxl.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_validates(path):
    cfg = load_config(path)
    assert cfg.concepts and cfg.training.max_train_steps > 0


def test_quickstart_runs_offline_on_shipped_data():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.model.pretrained.startswith("builtin:")
    folder = ROOT / cfg.concepts[0].instance_dir
    assert len(list(folder.glob("*.png"))) >= 3


def test_overrides_reach_nested_keys_and_lists():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      ["training.max_train_steps=7", "method.lora.rank=2", "concepts.0.class_noun=cat",
                       "validation.prompts=[\"a {V} {C}\"]"])
    assert (cfg.training.max_train_steps, cfg.method.lora.rank, cfg.concepts[0].class_noun) == (7, 2, "cat")
    assert cfg.validation.prompts == ["a {V} {C}"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_saved_config_can_be_fed_back(path):
    """Every output folder's config.yaml (all keys, defaults included) is a valid config again, unchanged."""
    cfg = load_config(path)
    again = load_config(base=cfg.model_dump(mode="json"))
    assert again == cfg


def test_styleforge_trains_the_text_encoder_against_auxiliary_images_by_default():
    from t2i_personal.config import method_config

    m = method_config(name="styleforge")
    assert m.train_text_encoder and m.prior == "auxiliary"
    assert not method_config(name="styleforge", train_text_encoder=False).train_text_encoder


def test_override_no_is_a_word_not_a_boolean():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["training.mixed_precision=no", "data.random_flip=false"])
    assert cfg.training.mixed_precision == "no" and cfg.data.random_flip is False


def test_yaml_no_for_mixed_precision_means_no(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("concepts: [{identifier: sks, class_noun: dog, instance_dir: x}]\ntraining: {mixed_precision: no}\n")
    assert load_config(preset).training.mixed_precision == "no"
