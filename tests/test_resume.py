"""Stopping after a checkpoint and resuming in a new process gives bit-identical weights to an uninterrupted run."""

import subprocess

import pytest
import yaml
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, base_config, python_subprocess_env, run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the same threads as the subprocesses it compares with


def cli(config: dict, tmp_path, *overrides) -> subprocess.CompletedProcess:
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([PYTHON, str(ROOT / "train" / "train.py"), "--config", str(path), *overrides],
                          env=python_subprocess_env(), cwd=tmp_path, capture_output=True, text=True)



@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_stop_and_resume_is_bit_exact(adapter, concept_dir, tmp_path):
    method = {"name": "dreambooth", "adapter": adapter, "prior": "class_images", "train_text_encoder": True}
    training = {"max_train_steps": 6, "gradient_accumulation_steps": 2, "checkpointing_steps": 3,
                "lr_scheduler": "cosine", "lr_warmup_steps": 2}
    data = {"random_flip": True, "center_crop": False}
    straight = base_config(concept_dir, tmp_path / "straight", method=method, training=training)
    straight["data"].update(data)
    run_training(straight)  # in this process: the stop and the resume below each run in a new one

    resumed = base_config(concept_dir, tmp_path / "resumed", method=method, training={**training, "stop_after_step": 3})
    resumed["data"].update(data)
    r = cli(resumed, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "resumed"
    assert not (out / "personalization.json").exists(), "a stopped run must not look finished"
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["checkpoint-000003"]
    r = cli(resumed, tmp_path, "training.stop_after_step=null", "training.resume=latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "personalization.json").exists()

    weight_file = "pytorch_lora_weights.safetensors" if adapter == "lora" else "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "straight" / weight_file)), load_file(str(out / weight_file))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:3]}"
    if adapter == "full":
        te_a = load_file(str(tmp_path / "straight" / "text_encoder" / "model.safetensors"))
        te_b = load_file(str(out / "text_encoder" / "model.safetensors"))
        assert all((te_a[k] == te_b[k]).all() for k in te_a)


def test_stop_request_saves_a_checkpoint_and_logs_progress(concept_dir, tmp_path):
    import json

    from t2i_personal.config import TrainConfig
    from t2i_personal.training.trainer import Trainer

    trainer = Trainer(TrainConfig.model_validate(base_config(concept_dir, tmp_path / "out", training={"max_train_steps": 5})))
    trainer.request_stop()  # e.g. the demo's Cancel: honoured after the step in progress
    out = trainer.train()
    assert not (out / "personalization.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["checkpoint-000001"]
    lines = [json.loads(line) for line in (out / "logs" / "progress.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1] and lines[0]["loss"] > 0 and "lr" in lines[0]


@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_that_resumes_bit_exact(concept_dir, tmp_path):
    import json
    import signal
    import time

    training, method = {"max_train_steps": 30, "checkpointing_steps": 100}, {"name": "dreambooth", "adapter": "lora"}
    run_training(base_config(concept_dir, tmp_path / "straight", training=training, method=method))

    stopped = base_config(concept_dir, tmp_path / "stopped", training=training, method=method)
    path = tmp_path / "stopped.yaml"
    path.write_text(yaml.safe_dump(stopped))
    proc = subprocess.Popen([PYTHON, str(ROOT / "train" / "train.py"), "--config", str(path)], env=python_subprocess_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "stopped" / "logs" / "progress.jsonl"
    deadline = time.monotonic() + 300
    while not (progress.exists() and progress.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "training.resume=latest" in err
    checkpoints = [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(checkpoints) == 1 and checkpoints[0] < "checkpoint-000030", checkpoints

    r = cli(stopped, tmp_path, "training.resume=latest")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "pytorch_lora_weights.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(line)["step"] for line in progress.read_text().splitlines()]
    assert steps == list(range(1, 31))  # lines after the resumed step were dropped, none repeated
