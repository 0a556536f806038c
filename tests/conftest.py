import copy
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Class images and the tokenizer files go to a per-session cache, never the user's."""
    os.environ["T2I_PERSONAL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    """With one test worker per core (pytest-xdist), a worker's own intra-op threads only fight the other workers
    for the cores: OpenMP's spinning then makes tests many times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads made
    such tests up to ~30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory) -> Path:
    from t2i_personal.data.examples import write_examples

    folder = tmp_path_factory.mktemp("toy-dog")
    write_examples(folder, count=3, size=48)
    return folder


def base_config(concept_dir, out_dir, **sections) -> dict:
    """A few-step run on builtin:tiny-sd at 32 px (8x8 latents)."""
    cfg = {
        "model": {"pretrained": "builtin:tiny-sd"},
        "concepts": [{"identifier": "sks", "class_noun": "dog", "instance_dir": str(concept_dir), "num_class_images": 2}],
        "method": {"name": "dreambooth"},
        "data": {"resolution": 32, "class_generation_steps": 2, "class_generation_batch_size": 2},
        "training": {"output_dir": str(out_dir), "max_train_steps": 3, "train_batch_size": 2, "learning_rate": 1e-3,
                     "checkpointing_steps": 1000, "report_to": "none", "progress_bar": False, "seed": 0},
        "export": {"kohya_lora": True},
    }
    for section, values in sections.items():
        if section in cfg and isinstance(cfg[section], dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return copy.deepcopy(cfg)


def run_training(cfg: dict):
    from t2i_personal.config import TrainConfig
    from t2i_personal.training.trainer import Trainer

    trainer = Trainer(TrainConfig.model_validate(cfg))
    trainer.train()
    return trainer


def python_subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    # One thread, as in-process tests run (one_torch_thread): tiny models gain nothing from more, and with several
    # test workers on few cores MKL's dynamic threading would change the summation order between two runs that
    # must agree bit for bit (resume tests).
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    return env


PYTHON = sys.executable


@pytest.fixture(scope="module")
def comps():
    """``comps("tiny-sd")``: a built-in model's components, built once per test module."""
    from t2i_personal.models.loading import load_components

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_components(f"builtin:{name}")
        return cache[name]

    return get


def assert_resume_is_exact(make_config, tmp_path, weights: str = "pytorch_lora_weights.safetensors") -> None:
    """``make_config(out, **training)``: a 4-step run with checkpoints every 2 steps. Straight through, and stopped
    at 2 then resumed, give bit-identical ``weights``."""
    import torch
    from safetensors.torch import load_file

    run_training(make_config(tmp_path / "straight"))
    stopped = make_config(tmp_path / "stopped", stop_after_step=2)
    run_training(stopped)
    stopped["training"].update(stop_after_step=None, resume="latest")
    run_training(stopped)
    a, b = (load_file(str(tmp_path / name / weights)) for name in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
