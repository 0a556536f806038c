"""Pretraining entry points and the quality gates of the shipped models."""

import json
import subprocess

import pytest
import torch
from conftest import PYTHON, ROOT, python_subprocess_env

from t2i_personal.toyworld import generator, pretrain


def test_unknown_setting_names_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["generator", "--set", "unet_step=5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown setting 'unet_step'" in err and "unet_steps" in err
    with pytest.raises(SystemExit):
        pretrain.main(["all", "--skip", "clipp"])


def test_recipes_only_use_settings_the_trainers_accept():
    for recipes in pretrain.RECIPES.values():
        for name, recipe in recipes.items():
            assert set(recipe) <= set(pretrain.settings_of(name)), name


@pytest.mark.slow
def test_generator_pretraining_writes_a_loadable_folder_and_can_continue(tmp_path):
    from diffusers import StableDiffusionPipeline

    small = dict(num_images=64, captions_per_image=2, vae_steps=2, vae_batch_size=4, unet_steps=2,
                 unet_batch_size=4, workers=1)
    first = generator.train(tmp_path / "a", **small)
    assert first["vae_steps_run"] == 2 and first["unet_steps_run"] == 2
    for name in ("training.json", "loss.png", "samples.png", "model_index.json"):
        assert (tmp_path / "a" / name).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert pipe.unet.dtype == torch.float32

    second = generator.train(tmp_path / "b", **{**small, "unet_steps": 0}, init_from=str(tmp_path / "a"),
                             vae_train_encoder=False)
    assert second["previous"]["unet_steps_run"] == 2 and "init_from" in second["reproduce"]
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "b")
    same = lambda m1, m2: all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert same(pipe.vae.encoder, again.vae.encoder) and same(pipe.unet, again.unet)  # latent space kept
    assert not same(pipe.vae.decoder, again.vae.decoder)
    assert again.vae.config.scaling_factor == pipe.vae.config.scaling_factor


@pytest.mark.slow
def test_quality_gates_hold(tmp_path):
    r = subprocess.run([PYTHON, "benchmarks/toyworld_gates.py", "--out", str(tmp_path), "--n-generations", "39",
                        "--n-eval", "100"], cwd=ROOT, env=python_subprocess_env(), capture_output=True, text=True,
                       timeout=900, check=False)
    metrics = json.loads((tmp_path / "gates.json").read_text())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert all(metrics["passed"].values()), metrics
    assert (tmp_path / "held_out_generations.png").is_file()
