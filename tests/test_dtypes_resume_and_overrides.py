"""Dtypes and exports under mixed precision, resume safety, prediction types, config overrides, class images
split across processes and model-loading messages."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config, run_training
from t2i_personal.config import TrainConfig, load_config, parse_override
from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.models.loading import load_components


def test_fp16_files_train_with_float32_master_weights(concept_dir, tmp_path):
    folder = tmp_path / "fp16-model"
    comps = load_components("builtin:tiny-sd")
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.to(torch.float16)
    comps.pipeline().save_pretrained(folder)
    trainer = run_training(base_config(concept_dir, tmp_path / "out", model={"pretrained": str(folder)},
                                       method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": True},
                                       training={"max_train_steps": 1}))
    for module in (trainer.components.unet, trainer.components.text_encoder):
        assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)


def test_bf16_full_finetune_exports_untouched_frozen_modules_bitwise(concept_dir, tmp_path):
    out = tmp_path / "out"
    run_training(base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "full"},
                             training={"mixed_precision": "bf16", "max_train_steps": 1}))
    base = load_components("builtin:tiny-sd")
    vae = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    te = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(vae[k], v) for k, v in base.vae.state_dict().items())
    assert all(torch.equal(te[k], v) for k, v in base.text_encoder.state_dict().items() if k in te)
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in unet.values())


def test_resume_in_a_finished_folder_is_refused(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", training={"max_train_steps": 2, "checkpointing_steps": 1})
    run_training(cfg)
    before = (tmp_path / "out" / "personalization.json").read_text()
    cfg["training"].update(resume="latest", max_train_steps=4)
    with pytest.raises(ConfigError, match="never overwritten"):
        run_training(cfg)
    assert (tmp_path / "out" / "personalization.json").read_text() == before


def test_resume_with_changed_settings_names_them(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora", "lora": {"rank": 4}},
                      training={"max_train_steps": 4, "checkpointing_steps": 2, "stop_after_step": 2})
    run_training(cfg)
    cfg["method"]["lora"]["rank"] = 8
    cfg["training"].update(stop_after_step=None, resume="latest")
    with pytest.raises(ConfigError, match=r"method\.lora\.rank: 4 -> 8"):
        run_training(cfg)
    assert not (tmp_path / "out" / "personalization.json").exists()


def test_prediction_type_override_reaches_sampling_and_export(concept_dir, tmp_path):
    out = tmp_path / "out"
    trainer = run_training(base_config(concept_dir, out, model={"pretrained": "builtin:tiny-sd2"},
                                       method={"name": "dreambooth", "adapter": "full"},
                                       training={"prediction_type": "epsilon", "max_train_steps": 1}))
    assert trainer.components.scheduler.config.prediction_type == "epsilon"
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "epsilon"


def test_launcher_mixed_precision_applies_unless_the_config_sets_one(concept_dir, tmp_path, monkeypatch):
    from t2i_personal.training.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    implicit = Trainer(TrainConfig.model_validate(base_config(concept_dir, tmp_path / "a")))
    assert implicit.config.training.mixed_precision == "bf16"
    cfg = base_config(concept_dir, tmp_path / "b")
    cfg["training"]["mixed_precision"] = "no"
    assert Trainer(TrainConfig.model_validate(cfg)).config.training.mixed_precision == "no"


def test_validation_samples_in_eval_mode(concept_dir, tmp_path):
    """With LoRA dropout, two validations of the same weights must agree (dropout off while sampling)."""
    trainer = run_training(base_config(concept_dir, tmp_path / "out",
                                       method={"name": "dreambooth", "adapter": "lora", "lora": {"dropout": 0.5}},
                                       validation={"prompts": ["a {V} {C}"], "every_n_steps": 100, "num_inference_steps": 2},
                                       training={"max_train_steps": 2}))
    from accelerate import Accelerator

    from t2i_personal.training.outputs import validate

    grids = []
    for i in range(2):
        trainer.config.training.output_dir = str(tmp_path / f"v{i}")
        path = validate(trainer.config, trainer.components, ["a sks dog"], Accelerator(), torch.float32, 1)
        grids.append(np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(path)))
    assert np.array_equal(grids[0], grids[1])
    assert trainer.components.unet.training, "training mode is restored afterwards"


def test_class_images_split_across_processes_give_the_same_set(tmp_path):
    """Two ranks (threads here, with a shared barrier) list the folder, then each generates its share."""
    import threading

    from PIL import Image

    from t2i_personal.data.images import list_image_files
    from t2i_personal.data.priors import ensure_class_images

    comps = load_components("builtin:tiny-sd")
    kwargs = dict(resolution=32, steps=2, guidance=5.0, batch_size=1, seed=0, device=torch.device("cpu"))
    ensure_class_images(comps.pipeline, tmp_path / "one", "a photo of dog", 3, **kwargs)
    barrier, made = threading.Barrier(2), {}

    def rank(r):
        made[r] = ensure_class_images(comps.pipeline, tmp_path / "two", "a photo of dog", 3, rank=r, world_size=2,
                                      barrier=barrier.wait, **kwargs)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == {0: 2, 1: 1}
    one, two = list_image_files(tmp_path / "one"), list_image_files(tmp_path / "two")
    assert [p.name[:5] for p in one] == [p.name[:5] for p in two] == ["00000", "00001", "00002"]
    # Same seeds, same images; concurrent threads may round differently in the last bit (real ranks are processes)
    for a, b in zip(one, two):
        diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int)).max()
        assert diff <= 2, (a.name, b.name, diff)


@pytest.mark.parametrize("text,expected", [
    ("concepts.0.instance_prompt={V} {C} at the beach", "{V} {C} at the beach"),
    ("concepts.0.instance_prompt={V}", "{V}"),
    ("training.max_train_steps=12", 12),
    ("validation.prompts=[a, b]", ["a", "b"]),
])
def test_override_values(text, expected):
    assert parse_override(text)[1] == expected


def test_prompt_template_override_end_to_end():
    cfg = load_config(None, ["concepts.0.instance_prompt={V} {C} at the beach"],
                      base={"concepts": [{"identifier": "sks", "class_noun": "dog", "instance_dir": "x"}]})
    assert cfg.concepts[0].instance_prompt == "{V} {C} at the beach"


def test_git_lfs_pointer_instead_of_weights(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ModelLoadError, match="git lfs pull"):
        load_components(str(path))


def test_missing_relative_folder_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no local folder"):
        load_components("models/sd15")


def test_float16_export_of_a_full_finetune(concept_dir, tmp_path):
    out = tmp_path / "out"
    trainer = run_training(base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "full"},
                                       training={"max_train_steps": 1}, export={"save_dtype": "float16", "single_file": True}))
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in unet.values())
    assert all(v.dtype == torch.float16 for v in load_file(str(out / "model.safetensors")).values() if v.is_floating_point())
    assert next(trainer.components.unet.parameters()).dtype == torch.float32, "the trained modules are not cast"
    from t2i_personal import load_personalized

    pipe = load_personalized(out, dtype=torch.float32)
    expected = {k: v.half().float() for k, v in trainer.components.unet.state_dict().items()}
    assert all(torch.equal(pipe.unet.state_dict()[k], expected[k]) for k in expected)


def test_training_on_from_a_finished_runs_checkpoint_into_a_new_folder(concept_dir, tmp_path):
    first = base_config(concept_dir, tmp_path / "first", method={"name": "dreambooth", "adapter": "lora"},
                        training={"max_train_steps": 2, "checkpointing_steps": 1})
    run_training(first)
    more = base_config(concept_dir, tmp_path / "more", method={"name": "dreambooth", "adapter": "lora"},
                       training={"max_train_steps": 4, "checkpointing_steps": 10,
                                 "resume": str(tmp_path / "first" / "checkpoints" / "checkpoint-000002")})
    assert not (tmp_path / "first" / "checkpoints" / "checkpoint-000002" / "inference").exists(), \
        "the final step's checkpoint does not duplicate the final export"
    trainer = run_training(more)
    assert json.loads((tmp_path / "more" / "personalization.json").read_text())["steps"] == 4
    assert len(trainer.step_seconds) == 2, "resumed at the end of the first run, ran steps 3-4"


def test_base_prediction_prior_with_a_different_prediction_type_is_refused(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora", "prior": "base_prediction"},
                      training={"prediction_type": "v_prediction"})
    with pytest.raises(ConfigError, match="base_prediction"):
        run_training(cfg)


def test_lora_result_loads_with_the_prediction_type_it_learned(concept_dir, tmp_path):
    from t2i_personal import load_personalized

    out = tmp_path / "out"
    run_training(base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "lora"},
                             training={"prediction_type": "v_prediction", "max_train_steps": 1}))
    assert load_personalized(out).scheduler.config.prediction_type == "v_prediction"


def test_frozen_unet_of_a_text_encoder_only_finetune_is_exported_untouched(concept_dir, tmp_path):
    out = tmp_path / "out"
    run_training(base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "full", "train_unet": False,
                                                       "train_text_encoder": True},
                             training={"mixed_precision": "bf16", "max_train_steps": 1}))
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_components("builtin:tiny-sd").unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in base.items())


def test_resume_refuses_another_process_count_and_a_lower_step_budget(concept_dir, tmp_path):
    from t2i_personal.training.checkpoint import check_resume_config

    cfg = base_config(concept_dir, tmp_path / "out", training={"max_train_steps": 4, "checkpointing_steps": 2,
                                                               "stop_after_step": 3})
    run_training(cfg)
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-000003"
    with pytest.raises(ConfigError, match="--num_processes 1"):
        check_resume_config(ckpt, TrainConfig.model_validate(cfg), num_processes=2)
    cfg["training"].update(stop_after_step=None, resume="latest", max_train_steps=2)
    with pytest.raises(ConfigError, match="beyond training.max_train_steps"):
        run_training(cfg)
