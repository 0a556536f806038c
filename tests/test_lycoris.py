"""LoHa and LoKr (``method.adapter: loha | lokr``, peft): they train, ``load_personalized`` reproduces the tuned
image from the saved file, and the LyCORIS / kohya file holds factors whose product, scaled as ComfyUI / A1111 scale
it, is the trained weight change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config, run_training
from t2i_personal import load_personalized

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of sks dog", num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images


def comfy_delta(kohya: dict, prefix: str) -> torch.Tensor:
    """The weight change ComfyUI / A1111 build from LyCORIS keys (their scale rules)."""
    alpha = float(kohya[f"{prefix}.alpha"])
    if f"{prefix}.hada_w1_a" in kohya:
        w1 = kohya[f"{prefix}.hada_w1_a"] @ kohya[f"{prefix}.hada_w1_b"]
        w2 = kohya[f"{prefix}.hada_w2_a"] @ kohya[f"{prefix}.hada_w2_b"]
        return w1 * w2 * alpha / kohya[f"{prefix}.hada_w1_b"].shape[0]
    w1 = kohya.get(f"{prefix}.lokr_w1")
    dim = None
    if w1 is None:
        w1, dim = kohya[f"{prefix}.lokr_w1_a"] @ kohya[f"{prefix}.lokr_w1_b"], kohya[f"{prefix}.lokr_w1_b"].shape[0]
    w2 = kohya.get(f"{prefix}.lokr_w2")
    if w2 is None:
        w2, dim = kohya[f"{prefix}.lokr_w2_a"] @ kohya[f"{prefix}.lokr_w2_b"], kohya[f"{prefix}.lokr_w2_b"].shape[0]
    return torch.kron(w1, w2) * (alpha / dim if dim is not None else 1.0)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_adapters_train_reload_and_export(kind, concept_dir, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(concept_dir, out, method={"name": "dreambooth", "adapter": kind, "train_text_encoder": True,
                                                "lora": {"rank": 4, "alpha": 8}},
                      training={"learning_rate": 5e-3, "max_train_steps": 4})
    trainer = run_training(cfg)
    tuned = generate(trainer.components.pipeline())
    record = json.loads((out / "personalization.json").read_text())
    assert record["artifact"]["type"] == kind and record["adapter"] == kind
    loaded = load_personalized(out)
    np.testing.assert_allclose(generate(loaded), tuned, atol=1e-5)
    kohya = load_file(str(out / "pytorch_lycoris_weights_kohya.safetensors"))
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    layers = {name: m for name, m in trainer.components.unet.named_modules() if hasattr(m, "get_delta_weight")
              and "default" in getattr(m, "scaling", {})}
    assert layers
    for name, layer in list(layers.items())[:3]:
        prefix = "lora_unet_" + name.replace(".", "_")
        torch.testing.assert_close(comfy_delta(kohya, prefix), layer.get_delta_weight("default").detach(),
                                   atol=1e-6, rtol=1e-5)


def test_lycoris_on_flux_reloads(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", model={"pretrained": "builtin:tiny-flux"},
                      method={"name": "dreambooth", "adapter": "loha"}, training={"learning_rate": 5e-2})
    cfg["training"]["train_batch_size"] = 1
    tuned = generate(run_training(cfg).components.pipeline())
    assert not (tmp_path / "out" / "pytorch_lycoris_weights_kohya.safetensors").exists()
    np.testing.assert_allclose(generate(load_personalized(tmp_path / "out")), tuned, atol=1e-5)


def test_dropout_and_dora_are_lora_only(concept_dir, tmp_path):
    from t2i_personal.config import TrainConfig

    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lokr",
                                                               "lora": {"use_dora": True}})
    with pytest.raises(ValueError, match="apply to adapter lora, not lokr"):
        TrainConfig.model_validate(cfg)
