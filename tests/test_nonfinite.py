"""The non-finite guard (``training.max_nonfinite_steps``): a NaN/inf loss or gradient skips the step with the
weights untouched; too many skipped steps stop the run with what to try; nothing non-finite is exported."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config, run_training
from t2i_personal.errors import TrainingDiverged
from t2i_personal.training import loop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at({2, 3})``: the micro-steps with those (1-based) numbers return a NaN loss term."""

    def install(bad_calls: set[int]):
        real, calls = loop.micro_step, {"n": 0}

        def micro_step(run, batch):
            calls["n"] += 1
            terms = real(run, batch)
            if calls["n"] in bad_calls:
                terms["denoise"] = terms["denoise"] * float("nan")
            return terms

        monkeypatch.setattr(loop, "micro_step", micro_step)

    return install


def lora_config(concept_dir, out, **training):
    return base_config(concept_dir, out, method={"name": "dreambooth", "adapter": "lora"},
                       training={"max_train_steps": 4, "checkpointing_steps": 1, **training})


def test_a_nan_step_is_skipped_and_the_run_finishes(concept_dir, tmp_path, nan_at):
    nan_at({2})
    run_training(lora_config(concept_dir, tmp_path / "out"))
    log = [json.loads(line) for line in (tmp_path / "out" / "logs" / "progress.jsonl").read_text().splitlines()]
    steps = {entry["step"]: entry for entry in log if "loss" in entry}
    assert steps[2].get("skipped") == 1.0 and "skipped" not in steps[3]
    # the skipped step left the weights as they were after step 1
    one = load_file(str(tmp_path / "out" / "checkpoints" / "checkpoint-000001" / "trainable.safetensors"))
    two = load_file(str(tmp_path / "out" / "checkpoints" / "checkpoint-000002" / "trainable.safetensors"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    state = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1
    final = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in final.values())


def test_too_many_nan_steps_stop_with_what_to_try(concept_dir, tmp_path, nan_at):
    nan_at({3, 4})
    cfg = lora_config(concept_dir, tmp_path / "out", max_nonfinite_steps=1)
    with pytest.raises(TrainingDiverged, match=r"stopped at step 4.*max_nonfinite_steps = 1.*checkpoint-000003.*bf16"):
        run_training(cfg)
    assert not (tmp_path / "out" / "personalization.json").exists()  # nothing exported
    # the latest checkpoint holds good weights and resumes (now without NaN) to the end
    cfg["training"]["resume"] = "latest"
    nan_at(set())
    run_training(cfg)
    assert (tmp_path / "out" / "personalization.json").is_file()


def test_non_finite_weights_are_never_exported(concept_dir, tmp_path, monkeypatch):
    real = loop.optimizer_step

    def poisoned(run, global_step, batches):
        logs = real(run, global_step, batches)
        with torch.no_grad():
            next(p for p in run.trainable).fill_(float("inf"))
        return logs

    monkeypatch.setattr(loop, "optimizer_step", poisoned)
    cfg = lora_config(concept_dir, tmp_path / "out", max_train_steps=1)
    cfg["export"]["inference_artifact_in_checkpoints"] = True
    with pytest.raises(TrainingDiverged, match="hold NaN/inf.*nothing was exported"):
        run_training(cfg)
    assert not (tmp_path / "out" / "personalization.json").exists()
