"""Trainer features: caching equivalence, validation grids, logging, checkpoint rotation, loss weighting."""

import pytest
import torch
from PIL import Image

from conftest import base_config, run_training


def lora_state(trainer):
    return {k: v.clone() for k, v in trainer.method.trainable_state_dict(trainer.components).items()}


def test_caching_latents_and_text_embeddings_trains_the_same(concept_dir, tmp_path):
    """Cached (mean, std) + per-step sampling reproduces the uncached run (up to VAE batch-size rounding)."""
    common = dict(method={"name": "dreambooth", "adapter": "lora", "prior": "base_prediction"})
    plain = run_training(base_config(concept_dir, tmp_path / "plain", **common, training={"max_train_steps": 4}))
    cached = run_training(base_config(concept_dir, tmp_path / "cached", **common,
                                      training={"max_train_steps": 4, "cache_latents": True, "cache_text_embeddings": True}))
    a, b = lora_state(plain), lora_state(cached)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    moved = run_training(base_config(concept_dir, tmp_path / "other-seed", **common,
                                     training={"max_train_steps": 4, "seed": 1, "cache_latents": True}))
    assert any(not torch.allclose(a[k], lora_state(moved)[k], atol=1e-4) for k in a), "seed must matter"


def test_validation_grids_and_tensorboard_logs(concept_dir, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "lora"},
                      training={"max_train_steps": 4, "report_to": "tensorboard"},
                      validation={"prompts": ["a photo of {V} {C}", "a {V} {C} on the beach"], "every_n_steps": 2,
                                  "num_images_per_prompt": 3, "num_inference_steps": 2})
    run_training(cfg)
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    with Image.open(out / "validation" / "step-000004.png") as grid:
        assert grid.size == (3 * 32, 2 * 32)  # one row per prompt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in (out / "logs").rglob("events.out.tfevents.*")]
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    assert {"loss", "denoise", "lr"} <= tags
    assert any(t.startswith("validation") for t in tags)


def test_checkpoint_rotation_keeps_the_newest(concept_dir, tmp_path):
    out = tmp_path / "out"
    run_training(base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "lora"},
                             training={"max_train_steps": 7, "checkpointing_steps": 2, "checkpoints_total_limit": 2}))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-000006", "checkpoint-000007"], names  # the last step always leaves one


def test_min_snr_weights_change_the_loss_but_not_the_data(concept_dir, tmp_path):
    a = run_training(base_config(concept_dir, tmp_path / "a", training={"max_train_steps": 1}))
    b = run_training(base_config(concept_dir, tmp_path / "b", training={"max_train_steps": 1, "snr_gamma": 1e-4}))
    assert b.last_logs["loss"] < 0.5 * a.last_logs["loss"], "min(SNR, gamma)/SNR < 1 shrinks every term"


def test_stream_sampler_is_a_pure_function_of_the_step():
    from t2i_personal.data.concepts import StreamBatchSampler

    s = StreamBatchSampler(length=5, batch_size=3, seed=7)
    first = [s.batch(m) for m in range(6)]
    assert [StreamBatchSampler(5, 3, 7, start=4).batch(m) for m in (4, 5)] == first[4:]
    seen = [i for batch in first[:5] for i, _ in batch][:15]
    assert sorted(seen[:5]) == list(range(5)), "each epoch is a permutation"
    shards = [StreamBatchSampler(5, 2, 7, num_processes=2, rank=r).batch(0) for r in (0, 1)]
    assert shards[0] + shards[1] == StreamBatchSampler(5, 4, 7).batch(0), "processes split one global batch"


def test_8bit_adamw_keeps_quantised_state(concept_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="the [dev] extra installs bitsandbytes")
    trainer = run_training(base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "full"},
                                       training={"optimizer": "adamw_8bit", "max_train_steps": 2}))
    assert (tmp_path / "out" / "personalization.json").exists()
    states = [st for st in trainer.optimizer.optimizer.state.values() if "state1" in st]
    # bitsandbytes keeps tensors under 4096 elements in 32 bits; the large conv kernels must be 8-bit
    assert states and any(st["state1"].dtype == torch.uint8 for st in states), "moments must be stored in 8 bits"
    assert isinstance(trainer.optimizer.optimizer, bnb.optim.AdamW8bit)


def test_8bit_adamw_if_available_falls_back_to_adamw(concept_dir, tmp_path, monkeypatch, caplog):
    from t2i_personal.training import setup as setup_module

    monkeypatch.setattr(setup_module, "importable", lambda name: name != "bitsandbytes")
    trainer = run_training(base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora"},
                                       training={"optimizer": "adamw_8bit_if_available", "max_train_steps": 1}))
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    assert "bitsandbytes is not installed" in caplog.text


def test_dataloader_workers_do_not_change_the_result(concept_dir, tmp_path):
    """Items are pure functions of (index, epoch, seed): worker processes see exactly what the main process would."""
    common = dict(method={"name": "dreambooth", "adapter": "lora"})
    a = run_training(base_config(concept_dir, tmp_path / "a", **common,
                                 data={"resolution": 32, "random_flip": True, "center_crop": False}))
    b = run_training(base_config(concept_dir, tmp_path / "b", **common,
                                 data={"resolution": 32, "random_flip": True, "center_crop": False, "num_workers": 2}))
    sa, sb = lora_state(a), lora_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
