"""The shipped toy-world models load through every intended path and mean something."""

import json

import numpy as np
import pytest
import torch

from t2i_personal.toyworld import generator, world
from t2i_personal.toyworld.pretrain import WEIGHTS_ROOT


def test_shipped_weights_are_safetensors_within_the_size_budget():
    files = list(WEIGHTS_ROOT.rglob("*"))
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} >= {"unet", "transformer", "vae", "text_encoder", "text_encoder_2", "clip",
                                                "face-parser", "oracle", "segmenter"}
    assert sum(f.stat().st_size for f in weights) <= 40 * 1024 * 1024  # both generators and the evaluation models
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    for folder in ("toy-sd", "toy-flux", "clip", "face-parser", "oracle", "segmenter"):  # training record and pictures next to the weights
        assert (WEIGHTS_ROOT / folder / "training.json").is_file() and (WEIGHTS_ROOT / folder / "loss.png").is_file()


def test_builtin_toy_loads_as_a_float32_sd_model():
    from t2i_personal.models.loading import load_components
    from t2i_personal.models.tokenizer import build_clip_tokenizer

    comps = load_components("builtin:toy")
    assert comps.family.name == "sd" and comps.source == "builtin:toy"
    assert all(p.dtype == torch.float32 for m in (comps.unet, comps.vae, comps.text_encoder) for p in m.parameters())
    assert comps.unet.config.cross_attention_dim == comps.text_encoder.config.hidden_size
    reference = build_clip_tokenizer()
    for text in ("a photo of sks dog wearing a red hat, on the beach!", "Ünïcode café teddy-bear's"):
        assert comps.tokenizer(text).input_ids == reference(text).input_ids


def test_plain_diffusers_loads_the_folder_in_float32():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(generator.WEIGHTS)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from this VAE's latents


@pytest.fixture(scope="module")
def oracle():
    from t2i_personal.toyworld.oracle import Oracle

    return Oracle.from_pretrained()


def test_a_fixed_seed_generation_is_recognisably_what_was_asked(oracle):
    from t2i_personal.toyworld.gates import generate

    asked = [world.Scene(cls=c, colour=k, scene=s) for c, k, s in (
        ("dog", "red", "grass"), ("car", "yellow", "city street"), ("vase", "green", "wooden floor"),
        ("teddy bear", "brown", "beach"), ("cat", "blue", "snow"), ("face", "red", "grass"))]
    images = generate([world.describe(s, full=True) for s in asked], steps=15, seed=0)
    readings = oracle.read(images)
    correct = sum(r["cls"] == s.cls for r, s in zip(readings, asked))
    assert correct >= 4, [r["cls"] for r in readings]  # chance is 1 in 6
    assert images.std() > 20  # not a flat or noisy mess


def test_oracle_reads_clean_renders(oracle):
    from t2i_personal.toyworld.dataset import render_set

    data = render_set(60, seed=4321, kind="oracle", workers=1)
    readings = oracle.read(data.images)
    assert np.mean([r["cls"] == s.cls for r, s in zip(readings, data.scenes)]) >= 0.95
    assert np.mean([r["scene"] == s.scene for r, s in zip(readings, data.scenes)]) >= 0.95
    assert np.mean([r["subject"] == s.subject for r, s in zip(readings, data.scenes)]) >= 0.95


def test_face_parser_loads_with_plain_transformers_and_finds_hair():
    from transformers import SegformerForSemanticSegmentation

    from t2i_personal.toyworld.face_parser import DEFAULT_PATH, load_face_parser, parse

    plain = SegformerForSemanticSegmentation.from_pretrained(DEFAULT_PATH)
    assert plain.dtype == torch.float32
    assert [plain.config.id2label[i] for i in range(len(world.FACE_LABELS))] == list(world.FACE_LABELS)
    model, processor = load_face_parser()
    r = world.render(world.Scene(cls="face", hair_colour="red", hair_length="long", hat="blue", scene="grass"))
    labels = parse(model, processor, [r.image])[0]
    for part, label in (("hair", "hair"), ("hat", "hat")):
        truth, found = r.masks[part], labels == world.FACE_LABELS.index(label)
        assert (truth & found).sum() / (truth | found).sum() > 0.7


def test_evaluation_clip_ranks_the_true_caption_first():
    from t2i_personal.toyworld.clip import load_toy_clip

    model, preprocess, tokenizer = load_toy_clip()
    from PIL import Image

    s = world.Scene(cls="car", colour="red", scene="snow")
    image = preprocess(Image.fromarray(world.render(s).image)).unsqueeze(0)
    captions = ["a photo of a red car in the snow", "a photo of a blue car in the snow",
                "a photo of a red dog in the snow", "a photo of a red car on the beach"]
    with torch.no_grad():
        img = model.encode_image(image)
        txt = model.encode_text(tokenizer(captions))
    assert img.shape == (1, 64)
    scores = (torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T)[0]
    assert scores.argmax().item() == 0


def test_training_records_say_how_to_reproduce_them():
    record = json.loads((generator.WEIGHTS / "training.json").read_text())
    stages = []
    while record:  # a continued run keeps the record of the run it started from
        assert "pretrain generator" in record["reproduce"]
        stages.append(record)
        record = record.get("previous")
    assert sum(stage["unet_steps_run"] for stage in stages) > 0
    assert "init_from" not in stages[-1]["reproduce"]  # the first stage started from scratch
