"""The toy-world oracle: training writes a loadable, self-describing folder; ``read`` speaks the world's vocabulary."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from t2i_personal.toyworld import world
from t2i_personal.toyworld.dataset import render_set
from t2i_personal.toyworld.oracle import (
    HEADS,
    Oracle,
    augment,
    gaussian_blur,
    label_matrix,
    scene_reading,
    train,
)

VOCAB = {"cls": set(world.CLASSES), "colour": set(world.COLOURS), "pattern": set(world.PATTERNS),
         "hat": set(world.HAT_COLOURS), "scene": set(world.SCENES), "expression": set(world.EXPRESSIONS),
         "hair_colour": set(world.HAIR_COLOURS), "hair_length": set(world.HAIR_LENGTHS),
         "subject": set(world.SUBJECTS)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps on a tiny set: enough to exercise every output file, not to read anything correctly."""
    out = tmp_path_factory.mktemp("oracle")
    report = train(out, steps=2, batch_size=8, num_images=24, eval_images=12, workers=1)
    return out, report


@pytest.fixture(scope="module")
def renders():
    return render_set(6, seed=3, kind="oracle", workers=1)


def test_train_writes_a_complete_folder(trained):
    out, report = trained
    for name in ("config.json", "model.safetensors", "training.json", "loss.png", "samples.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "training.json").read_text())["steps_done"] == report["steps_done"] == 2
    assert set(report["accuracy"]) == set(HEADS)
    config = json.loads((out / "config.json").read_text())
    assert config["heads"] == {h: list(v) for h, v in HEADS.items()}


def test_weights_are_fp16_and_small(trained):
    out, _ = trained
    path = out / "model.safetensors"
    assert path.stat().st_size <= 3 * 2**20
    floats = [t.dtype for t in load_file(path).values() if t.is_floating_point()]
    assert floats and set(floats) == {torch.float16}


def test_save_load_round_trip_is_exact(trained, tmp_path, renders):
    out, _ = trained
    first = Oracle.from_pretrained(out)
    assert not first.training and next(first.parameters()).dtype == torch.float32
    second = Oracle.from_pretrained(first.save_pretrained(tmp_path / "again"))
    a, b = first.logits(renders.images), second.logits(renders.images)
    assert all(torch.equal(a[h], b[h]) for h in HEADS)
    assert first.read(renders.images) == second.read(renders.images)


def _check_reading(r: dict):
    assert set(r) == set(HEADS) | {"probs"}
    for head, labels in VOCAB.items():
        assert r[head] is None or r[head] in labels, (head, r[head])
    assert r["cls"] is not None and r["scene"] is not None
    assert isinstance(r["glasses"], bool) and isinstance(r["scarf"], bool)
    for head, probs in r["probs"].items():
        assert list(probs) == list(HEADS[head])
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)


def test_read_takes_pil_array_and_tensor_alike(trained, renders):
    oracle = Oracle.from_pretrained(trained[0])
    pil = [Image.fromarray(i) for i in renders.images]
    tensor = renders.tensor(slice(None))
    readings = oracle.read(renders.images)
    assert len(readings) == len(renders)
    for r in readings:
        _check_reading(r)
    assert oracle.read(pil) == readings
    assert [r["cls"] for r in oracle.read(tensor)] == [r["cls"] for r in readings]
    big = oracle.read([p.resize((100, 100), Image.NEAREST) for p in pil])  # any size: resized to 64 first
    assert len(big) == len(pil)
    _check_reading(big[0])


def test_missing_weights_name_the_path_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="toyworld.pretrain oracle") as err:
        Oracle.from_pretrained(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


def test_labels_mask_heads_that_do_not_apply():
    car = world.Scene("car", colour="blue", pattern="striped", hat="red")
    face = world.Scene("face", colour="green", hair_colour="blonde", expression="smiling")
    dog = world.Scene("dog", subject="dog", glasses=True)
    col = {h: j for j, h in enumerate(HEADS)}
    m = label_matrix([car, face, dog])
    assert m[0, col["hat"]] == -1 and m[0, col["expression"]] == -1
    assert m[0, col["pattern"]] == world.PATTERNS.index("striped")
    assert m[1, col["pattern"]] == -1 and m[1, col["hair_colour"]] == list(world.HAIR_COLOURS).index("blonde")
    assert m[2, col["colour"]] == -1 and m[2, col["subject"]] == 1 and m[2, col["glasses"]] == 1
    assert scene_reading(car) == {**scene_reading(car), "hat": None, "glasses": False, "expression": None,
                                  "colour": "blue", "pattern": "striped"}
    assert scene_reading(dog)["colour"] is None and scene_reading(dog)["subject"] == "dog"


def test_augment_keeps_shape_range_and_is_seeded():
    x = render_set(4, seed=1, kind="oracle", workers=1).tensor(slice(None))
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(gaussian_blur(x, torch.zeros(4)), x, atol=1e-6)
    assert not torch.allclose(gaussian_blur(x, torch.ones(4)), x, atol=1e-2)
    assert np.isfinite(a.numpy()).all()
