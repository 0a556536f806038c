"""Settings added with learned tokens, Custom Diffusion, SPL and the rescale augmentation: checkpoints written
before them still resume, contradictory settings are refused before anything is written, the Custom Diffusion
presets enable the augmentation, and a single-file export with learned tokens loads with the base architecture."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, base_config, run_training
from t2i_personal.config import ModelConfig, TrainConfig, load_config
from t2i_personal.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOKEN_CONCEPT = {"identifier": "<new1>", "initializer_token": "dog", "class_noun": "dog"}


def test_checkpoint_written_before_the_new_keys_still_resumes(concept_dir, tmp_path):
    from t2i_personal.training.checkpoint import check_resume_config

    config = TrainConfig.model_validate(base_config(concept_dir, tmp_path / "out"))
    saved = config.model_dump(mode="json")
    # what 0a7f61a wrote into trainer_state.json: none of the keys this change added
    del saved["method"]["spl"]
    del saved["data"]["rescale_augmentation"], saved["training"]["token_learning_rate"]
    del saved["concepts"][0]["initializer_token"]
    ckpt = tmp_path / "checkpoint-000001"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1, "num_processes": 1, "config": saved}))
    check_resume_config(ckpt, config, 1)  # same settings: must be accepted

    # what versions before the per-method sections wrote: every method's keys, the other methods' at defaults
    saved["method"]["custom_diffusion_params"] = "crossattn_kv"
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1, "num_processes": 1, "config": saved}))
    check_resume_config(ckpt, config, 1)


def test_empty_instance_dir_list_is_rejected(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out")
    cfg["concepts"].append({"identifier": "zwx", "class_noun": "cat", "instance_dir": []})
    with pytest.raises(ConfigError, match="instance_dir"):
        load_config(base=cfg)


@pytest.mark.parametrize("preset", ["custom_diffusion.yaml", "classdiffusion.yaml"])
def test_custom_diffusion_presets_enable_the_rescale_augmentation(preset):
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.data.rescale_augmentation


def test_spl_argmax_id_on_sdxl_fails_before_anything_is_written(concept_dir, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(concept_dir, out, model={"pretrained": "builtin:tiny-sdxl"},
                      method={"name": "dreambooth", "train_unet": False, "spl": {"pooling": "argmax_id"}},
                      concepts=[{**TOKEN_CONCEPT, "instance_dir": str(concept_dir)}],
                      training={"max_train_steps": 1})
    with pytest.raises(ConfigError, match="argmax_id"):
        run_training(cfg)
    assert not out.exists()


def test_single_file_export_with_learned_tokens_loads_with_the_base_architecture(concept_dir, tmp_path):
    from t2i_personal.models.loading import load_components

    base_dir = tmp_path / "base"
    load_components("builtin:tiny-sd").pipeline().save_pretrained(base_dir)
    out = tmp_path / "out"
    run_training(base_config(concept_dir, out, concepts=[{**TOKEN_CONCEPT, "instance_dir": str(concept_dir)}],
                             training={"max_train_steps": 1}, export={"single_file": True}))
    loaded = load_components(ModelConfig(pretrained=str(out / "model.safetensors"), config_dir=str(base_dir)))
    assert loaded.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    assert Path(out / "learned_embeds-0-new1.safetensors").is_file()  # the token travels as its own embedding file
