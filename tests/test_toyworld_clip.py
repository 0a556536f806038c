"""The toy-world evaluation CLIP: a few training steps give a folder that plain open_clip loads offline.

Accuracy of the shipped weights is gated elsewhere; here a 2-step model only has to have the right format.
"""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from t2i_personal.toyworld import clip, world

MAX_WEIGHT_BYTES = 8_000_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy-clip")
    record = clip.train(folder, steps=2, batch_size=16, num_images=64, workers=1)
    return folder, record


@pytest.fixture(scope="module")
def loaded(trained):
    return clip.load_toy_clip(trained[0])


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


def test_training_writes_a_self_contained_folder(trained):
    folder, record = trained
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "training.json", "loss.png", "retrieval.png"):
        assert (folder / name).is_file(), name
    assert record["steps_done"] == 2
    assert json.loads((folder / "training.json").read_text())["steps_done"] == 2
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == json.loads(clip.CONFIG_PATH.read_text())


def test_weights_are_fp16_and_small(trained):
    path = trained[0] / "open_clip_model.safetensors"
    assert path.stat().st_size <= MAX_WEIGHT_BYTES
    assert {t.dtype for t in load_file(path).values()} == {torch.float16}


def test_load_toy_clip_gives_float32_eval_model_with_64d_embeddings(loaded):
    model, preprocess, tokenizer = loaded
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(im) for im in _images(3)]))
        text_features = model.encode_text(tokenizer(["a red dog", "a blue car", "a person"]))
    assert image_features.shape == (3, 64) and text_features.shape == (3, 64)


@pytest.mark.parametrize("route", ["registered name", "local-dir"])
def test_plain_open_clip_loads_the_same_model(trained, loaded, route):
    folder = trained[0]
    if route == "registered name":
        open_clip.add_model_config(clip.CONFIG_PATH)
        model, _, _ = open_clip.create_model_and_transforms(
            "toy-clip", pretrained=str(folder / "open_clip_model.safetensors"))
    else:
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    reference, preprocess, tokenizer = loaded
    pixels = torch.stack([preprocess(im) for im in _images(2)])
    text = tokenizer(["a red dog", "a blue car"])
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(pixels), reference.encode_image(pixels))
        assert torch.allclose(model.encode_text(text), reference.encode_text(text))


def test_tokenizer_is_the_real_clip_bpe():
    clip.register_config()
    tokenizer = open_clip.get_tokenizer("toy-clip")
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    ids = tokenizer(["a red dog"])[0]
    assert ids.shape == (77,)
    assert ids[:5].tolist() == [49406, 320, 736, 1929, 49407]  # <start> a red dog <end>


def test_training_inputs_match_what_preprocess_gives(loaded):
    """Training normalises uint8 tensors itself; a user goes through ``preprocess`` on PIL images: same numbers."""
    model, preprocess, _ = loaded
    images = np.stack([np.asarray(im) for im in _images(2)])
    ours = clip._normaliser(model, "cpu")(torch.from_numpy(images).permute(0, 3, 1, 2))
    theirs = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_caption_bank_starts_with_the_full_caption():
    import random

    scenes = [world.sample_scene(random.Random(i)) for i in range(3)]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    bank = clip.caption_bank(scenes, per_image=4, seed=0, tokenizer=tokenizer)
    assert bank.shape == (3, 4, 77)
    assert torch.equal(bank[:, 0].long(), tokenizer([world.describe(s, full=True) for s in scenes]))


def test_augment_shifts_and_mirrors_without_changing_shape():
    images = torch.arange(64, dtype=torch.uint8).repeat(16, 3, 64, 1)  # each row counts 0..63 left to right
    out = clip._augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    steps = out[:, 0, 32].long().diff(dim=1)
    rising, falling = (steps >= 0).all(dim=1), (steps <= 0).all(dim=1)
    assert (rising | falling).all()  # every row is still a (shifted, edge-clamped) ramp, mirrored or not
    assert rising.any() and falling.any()
    assert not torch.equal(out[rising][:, 0, 32, 10], torch.full((int(rising.sum()),), 10, dtype=torch.uint8))


def test_retrieval_accuracy_runs_on_fresh_images(loaded):
    accuracy = clip.retrieval_accuracy(*loaded, n=10)
    assert 0.0 <= accuracy <= 1.0


def test_missing_weights_name_the_path_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain clip") as info:
        clip.load_toy_clip(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)
