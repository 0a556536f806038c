"""Stopping after a checkpoint and resuming in a new process gives bit-identical weights to an uninterrupted run."""

import subprocess

import pytest
import yaml
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, base_config, python_subprocess_env


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
    r = cli(straight, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

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
