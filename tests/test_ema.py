"""training.ema: the averaged trainable weights are what validation and exports show; checkpoints carry them, so a
resumed run exports exactly what an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import assert_resume_is_exact, base_config, run_training
from t2i_personal.config import TrainConfig
from t2i_personal.training.ema import TrainableEMA

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ema_follows_the_warmed_up_decay():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = TrainableEMA([p], decay=0.9, every=2, device="cpu")
    expected, updates = torch.zeros(3), 0
    for step in range(1, 7):
        with torch.no_grad():
            p.add_(1.0)
        ema.update(step)
        if step % 2 == 0:
            d = min(0.9, (1 + updates) / (10 + updates))
            expected = expected + (1 - d) * (p.detach() - expected)
            updates += 1
    assert torch.allclose(ema.shadow[0], expected) and ema.updates == 3
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), torch.full((3,), 6.0))  # the trained weights are back


def ema_config(concept_dir, out, **training):
    return base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "lora"},
                       training={"max_train_steps": 4, "checkpointing_steps": 2, "ema": True, "ema_decay": 0.5,
                                 "learning_rate": 1e-2, **training})


@pytest.mark.parametrize("device", ["same", "cpu"])
def test_exports_hold_the_average_and_resume_is_exact(device, concept_dir, tmp_path):
    assert_resume_is_exact(lambda out, **t: ema_config(concept_dir, out, ema_device=device, **t), tmp_path)
    # the export is the average, not the last trained weights (which the final checkpoint holds)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    raw = load_file(str(tmp_path / "straight" / "checkpoints" / "checkpoint-000004" / "trainable.safetensors"))
    ema = load_file(str(tmp_path / "straight" / "checkpoints" / "checkpoint-000004" / "ema.safetensors"))
    assert int(ema["ema.updates"]) == 4
    averaged = [v for k, v in ema.items() if k != "ema.updates"]
    trained = list(raw.values())
    ups = [v for k, v in a.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(any(u.shape == e.shape and torch.equal(u, e) for e in averaged) for u in ups)
    assert not any(u.shape == r.shape and torch.equal(u, r) for u in ups for r in trained)


def test_ema_settings_without_ema_are_refused(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", training={"ema_decay": 0.99})
    with pytest.raises(ValidationError, match="training.ema is false"):
        TrainConfig.model_validate(cfg)
