"""Exported artifacts load in plain diffusers (a separate process that never imports t2i_personal) and
reproduce the in-memory tuned model exactly: diffusers LoRA file, kohya LoRA file, full pipeline folder."""

import json
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from conftest import PYTHON, base_config, python_subprocess_env, run_training
from t2i_personal import load_personalized
from t2i_personal.models.loading import load_components

PROMPT = "a photo of sks dog"

PLAIN_DIFFUSERS = textwrap.dedent("""
    import sys, numpy as np, torch
    assert "t2i_personal" not in sys.modules
    from diffusers import DiffusionPipeline
    base, out, npy, *weight_names = sys.argv[1:]
    def run(folder, weight_name=None):
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        if weight_name:
            pipe.load_lora_weights(out, weight_name=weight_name)
        g = torch.Generator().manual_seed(0)
        return pipe("a photo of sks dog", num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images
    images = [run(base)] + [run(out) if w == "pipeline" else run(base, w) for w in weight_names]
    np.save(npy, np.stack(images))
    assert "t2i_personal" not in sys.modules
""")


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images


def plain_diffusers(tmp_path, base, out, *weight_names) -> np.ndarray:
    """In one fresh process (imports dominate its time): the base's image, then one image per LoRA file loaded
    into a fresh base (or ``"pipeline"``: the saved pipeline ``out`` itself)."""
    script, npy = tmp_path / "plain.py", tmp_path / "plain.npy"
    script.write_text(PLAIN_DIFFUSERS)
    subprocess.run([PYTHON, str(script), str(base), str(out), str(npy), *weight_names], check=True,
                   env=python_subprocess_env(), cwd=tmp_path)
    return np.load(npy)


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    """The tiny bases written as ordinary diffusers folders, so plain diffusers can open them."""
    root = tmp_path_factory.mktemp("bases")
    for name in ("tiny-sd", "tiny-sdxl"):
        load_components(f"builtin:{name}").pipeline().save_pretrained(root / name)
    return root


@pytest.mark.parametrize("model,train_te", [("tiny-sd", False), ("tiny-sd", True), ("tiny-sdxl", True)])
def test_lora_exports_match_in_memory_model_in_plain_diffusers(model, train_te, saved_bases, concept_dir, tmp_path):
    base = saved_bases / model
    out = tmp_path / "out"
    # alpha != rank: the classic trap where a loader assumes scale 1.0
    cfg = base_config(concept_dir, out, model={"pretrained": str(base)},
                      method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": train_te,
                              "lora": {"rank": 4, "alpha": 8}},
                      training={"learning_rate": 5e-3, "max_train_steps": 4})
    trainer = run_training(cfg)
    in_memory = generate(trainer.components.pipeline())

    before, diffusers_lora, kohya_lora = plain_diffusers(tmp_path, base, out, "pytorch_lora_weights.safetensors",
                                                         "pytorch_lora_weights_kohya.safetensors")
    assert np.abs(diffusers_lora - before).max() > 1e-3, "the LoRA must change the output"
    np.testing.assert_allclose(diffusers_lora, in_memory, atol=2e-5)
    np.testing.assert_allclose(kohya_lora, in_memory, atol=2e-5)
    np.testing.assert_allclose(generate(load_personalized(out)), in_memory, atol=2e-5)


def test_kohya_file_uses_a1111_keys_and_the_trained_alpha(concept_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    run_training(base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": True,
                                                       "lora": {"rank": 2, "alpha": 6}}, training={"max_train_steps": 1}))
    with safe_open(str(out / "pytorch_lora_weights_kohya.safetensors"), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        assert f.metadata()["ss_network_alpha"] == "6.0"
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_") and k.endswith(".lora_up.weight") for k in keys)
    assert alphas == {6.0}


def test_full_finetune_is_a_plain_diffusers_pipeline(saved_bases, concept_dir, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(concept_dir, out, model={"pretrained": str(saved_bases / "tiny-sd")},
                      method={"name": "dreambooth", "adapter": "full", "train_text_encoder": True})
    trainer = run_training(cfg)
    in_memory = generate(trainer.components.pipeline())
    before, after = plain_diffusers(tmp_path, saved_bases / "tiny-sd", out, "pipeline")
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_allclose(after, in_memory, atol=1e-5)
    np.testing.assert_allclose(generate(load_personalized(out)), in_memory, atol=1e-5)


def test_checkpoint_holds_a_ready_to_use_artifact(concept_dir, tmp_path):
    out = tmp_path / "out"
    run_training(base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "lora"},
                             training={"max_train_steps": 4, "checkpointing_steps": 2}))
    ckpt = out / "checkpoints" / "checkpoint-000002"
    record = json.loads((ckpt / "inference" / "personalization.json").read_text())
    assert record["steps"] == 2
    pipe = load_personalized(ckpt)  # the checkpoint folder itself is accepted
    final = load_personalized(out)
    assert not np.allclose(generate(pipe), generate(final)), "step 2 and step 4 weights differ"


def test_load_personalized_refuses_an_unfinished_folder(tmp_path):
    from t2i_personal.errors import ModelLoadError

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ModelLoadError, match="personalization.json"):
        load_personalized(tmp_path)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("train_te", [False, True])
def test_dora_exports_match_in_memory_model_in_plain_diffusers(model, train_te, saved_bases, concept_dir, tmp_path,
                                                               one_torch_thread):
    """method.lora.use_dora: the diffusers file (lora_magnitude_vector) reproduces the tuned image in plain
    diffusers (one thread on both sides, as the subprocess runs: DoRA's weight norms make the image sensitive to the
    summation order). The kohya file carries LyCORIS' ``dora_scale`` (out, 1), which ComfyUI / A1111 read and
    diffusers' kohya loader drops: checked against peft's merged weights with LyCORIS' formula
    W' = dora_scale · (W + s·up·down) / ‖W + s·up·down‖_row."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cfg = base_config(concept_dir, out, model={"pretrained": str(saved_bases / model)},
                      method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": train_te,
                              "lora": {"rank": 4, "alpha": 8, "use_dora": True}},
                      training={"learning_rate": 5e-3, "max_train_steps": 4})
    trainer = run_training(cfg)
    in_memory = generate(trainer.components.pipeline())
    assert any("lora_magnitude_vector" in k for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    before, diffusers_lora = plain_diffusers(tmp_path, saved_bases / model, out, "pytorch_lora_weights.safetensors")
    assert np.abs(diffusers_lora - before).max() > 1e-3
    np.testing.assert_allclose(diffusers_lora, in_memory, atol=2e-5)
    np.testing.assert_allclose(generate(load_personalized(out)), in_memory, atol=2e-5)

    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    adapted = {"lora_unet_" + n.replace(".", "_"): m for n, m in trainer.components.unet.named_modules()
               if hasattr(m, "lora_magnitude_vector")}
    prefix = next(k[: -len(".dora_scale")] for k in kohya if k.endswith(".dora_scale") and k.startswith("lora_unet_"))
    module = adapted[prefix]
    base = module.base_layer.weight.detach()
    scale = float(kohya[f"{prefix}.alpha"]) / kohya[f"{prefix}.lora_down.weight"].shape[0]
    combined = base + scale * kohya[f"{prefix}.lora_up.weight"] @ kohya[f"{prefix}.lora_down.weight"]
    assert kohya[f"{prefix}.dora_scale"].shape == (base.shape[0], 1)
    rebuilt = kohya[f"{prefix}.dora_scale"] * combined / combined.norm(dim=1, keepdim=True)
    module.merge()
    torch.testing.assert_close(rebuilt, module.base_layer.weight.detach(), atol=1e-5, rtol=1e-5)
