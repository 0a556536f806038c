"""Every training mode runs a few steps on tiny components: what must train changes, everything else is bitwise
unchanged, and the exported artifact is complete."""

import json

import pytest
import torch

from conftest import base_config, run_training
from t2i_personal.models.loading import load_components


def base_weights(module) -> dict[str, torch.Tensor]:
    """Weights without LoRA tensors, with peft's ``base_layer.`` infix removed, so before/after compare by name."""
    return {k.replace("base_layer.", ""): v.detach().float().clone() for k, v in module.state_dict().items()
            if "lora_" not in k}


def lora_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_B" in k}


MODES = {
    "full": ({"adapter": "full"}, {"unet"}, "tiny-sd"),
    "full+te": ({"adapter": "full", "train_text_encoder": True}, {"unet", "text_encoder"}, "tiny-sd"),
    "lora": ({"adapter": "lora", "lora": {"rank": 2}}, {"unet:lora"}, "tiny-sd"),
    "lora+te": ({"adapter": "lora", "train_text_encoder": True}, {"unet:lora", "text_encoder:lora"}, "tiny-sd"),
    "lora+te-checkpointing": ({"adapter": "lora", "train_text_encoder": True}, {"unet:lora", "text_encoder:lora"},
                              "tiny-sd"),
    "te-only-lora": ({"adapter": "lora", "train_unet": False, "train_text_encoder": True}, {"text_encoder:lora"}, "tiny-sd"),
    "sdxl-lora": ({"adapter": "lora"}, {"unet:lora"}, "tiny-sdxl"),
    "sdxl-lora+te": ({"adapter": "lora", "train_text_encoder": True},
                     {"unet:lora", "text_encoder:lora", "text_encoder_2:lora"}, "tiny-sdxl"),
    "sd2-full-vpred": ({"adapter": "full"}, {"unet"}, "tiny-sd2"),
    "prior-generated": ({"adapter": "lora", "prior": "class_images"}, {"unet:lora"}, "tiny-sd"),
    "prior-base-prediction-lora": ({"adapter": "lora", "prior": "base_prediction", "train_text_encoder": True},
                                   {"unet:lora", "text_encoder:lora"}, "tiny-sd"),
    "prior-base-prediction-full": ({"adapter": "full", "prior": "base_prediction"}, {"unet"}, "tiny-sd"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_trains_only_what_it_should(mode, concept_dir, tmp_path):
    method, trained, model = MODES[mode]
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", **method},
                      model={"pretrained": f"builtin:{model}"})
    if "checkpointing" in mode:
        cfg["training"]["gradient_checkpointing"] = True
    if model == "tiny-sd2":
        cfg["training"].update(snr_gamma=5.0, noise_offset=0.05)
    trainer = run_training(cfg)
    before, after = load_components(f"builtin:{model}"), trainer.components
    terms = set(trainer.last_logs)
    assert "denoise" in terms
    assert ("prior" in terms) == (method.get("prior", "none") != "none")

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        b, a = getattr(before, name), getattr(after, name)
        if b is None:
            continue
        old, new = base_weights(b), base_weights(a)
        assert old.keys() == new.keys()
        changed = [k for k in old if not torch.equal(old[k], new[k])]
        if name in trained:
            assert changed, f"{name} should have trained"
        else:
            assert not changed, f"{name} must be frozen, but {changed[:3]} changed"
        if f"{name}:lora" in trained:
            lora = lora_weights(a)
            still = [k for k, v in lora.items() if v.abs().sum() == 0]
            # SDXL conditions on the penultimate hidden state of text_encoder: its last layer gets no gradient.
            allowed = {k for k in lora if model == "tiny-sdxl" and name == "text_encoder" and ".layers.1." in k}
            assert lora and set(still) <= allowed, f"{name} LoRA B matrices did not move: {still[:3]}"

    out = tmp_path / "out"
    record = json.loads((out / "personalization.json").read_text())
    assert record["steps"] == 3 and record["method"] == "dreambooth" and record["base_model"]["pretrained"] == f"builtin:{model}"
    if method["adapter"] == "full":
        assert record["artifact"]["type"] == "pipeline" and (out / "model_index.json").is_file()
        exported = [p for p in out.rglob("*.bin") if "checkpoints" not in p.parts]  # accelerate's optimizer state
        assert not exported, "full fine-tunes are saved as safetensors only"
    else:
        assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "pytorch_lora_weights_kohya.safetensors").is_file()


def test_bf16_mixed_precision_lora_runs_on_cpu(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora"},
                      training={"mixed_precision": "bf16", "max_train_steps": 2})
    trainer = run_training(cfg)
    unet = trainer.components.unet
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad), "trainable LoRA stays fp32"
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if not p.requires_grad)
    assert torch.isfinite(torch.tensor(trainer.last_logs["loss"]))


def test_overfitting_one_image_lowers_the_loss_clearly(tmp_path):
    """One image, a fixed set of (noise, timestep) probes: the tuned UNet denoises it much better than the base."""
    from t2i_personal.data.examples import write_examples
    from t2i_personal.data.images import load_image_rgb
    from t2i_personal.data.transforms import ImageTransform
    import random

    folder = tmp_path / "one"
    write_examples(folder, count=1, size=32)
    cfg = base_config(folder, tmp_path / "out", method={"name": "dreambooth", "adapter": "full"},
                      training={"max_train_steps": 60, "train_batch_size": 4, "learning_rate": 2e-3, "max_grad_norm": None})
    trainer = run_training(cfg)

    def probe_loss(components) -> float:
        image = load_image_rgb(next(folder.iterdir()))
        pixels = ImageTransform(32)(image, random.Random(0)).pixels[None]
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            latents = components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor
            latents = latents.repeat(16, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=g)
            t = torch.linspace(50, 950, 16).long()
            sched = __import__("diffusers").DDPMScheduler.from_config(components.scheduler.config)
            ids = components.tokenize(["a photo of sks dog"] * 16)
            hidden = components.encode(ids).encoder_hidden_states
            pred = components.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
            return torch.nn.functional.mse_loss(pred, noise).item()

    base, tuned = probe_loss(load_components("builtin:tiny-sd")), probe_loss(trainer.components)
    assert tuned < 0.6 * base, (base, tuned)
