"""Two processes through `accelerate launch` (DDP over gloo on CPU): the multi-GPU code path end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_config, python_subprocess_env


@pytest.mark.slow
@pytest.mark.parametrize("model,method", [
    ("tiny-sd", {"adapter": "lora", "prior": "class_images"}),
    # SDXL conditions on text_encoder's penultimate layer: DDP must tolerate its unused last layer
    ("tiny-sdxl", {"adapter": "lora", "train_text_encoder": True}),
])
def test_two_process_training_with_accumulation_and_checkpoints(model, method, concept_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")  # the CLI installed beside this interpreter
    assert accelerate.exists(), "accelerate's CLI is installed with the package"
    out = tmp_path / "out"
    cfg = base_config(concept_dir, out, model={"pretrained": f"builtin:{model}"}, method={"name": "dreambooth", **method},
                      training={"max_train_steps": 4, "train_batch_size": 1, "gradient_accumulation_steps": 2,
                                "checkpointing_steps": 2},
                      validation={"prompts": ["a photo of {V} {C}"], "every_n_steps": 2, "num_inference_steps": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train" / "train.py"),
                        "--config", str(path)], env=python_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    record = json.loads((out / "personalization.json").read_text())
    assert record["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
