"""``python -m t2i_personal.caption``: captions written as side files, always with {V}; a transformers BLIP
captioner (a tiny random one, saved and loaded as a user's would be) and the toy world's oracle captioner."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from t2i_personal import caption
from t2i_personal.data.captions import prompt_for_image


@pytest.mark.parametrize("text, expected", [
    ("a dog sitting on the grass", "a {V} {C} sitting on the grass"),
    ("A Dog and another dog", "A {V} {C} and another dog"),
    ("a hotdog stand", "a photo of {V} {C}, a hotdog stand"),
    ("", "a photo of {V} {C}"),
    ("a {V} {C} already", "a {V} {C} already"),
])
def test_the_identifier_is_always_in(text, expected):
    assert caption.with_identifier(text, "dog") == expected


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "dog", "on", "the", "grass"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizerFast(str(folder / "vocab.txt"), bos_token="[DEC]"))
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return str(folder / "model")


def test_blip_captions_are_written_beside_the_images(tiny_blip, concept_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(p for p in concept_dir.iterdir() if p.suffix == ".png"):
        (folder / path.name).write_bytes(path.read_bytes())
    first = sorted(folder.glob("*.png"))[0]
    first.with_suffix(".txt").write_text("my own words about {V} {C}\n")
    assert caption.main([str(folder), "--class-noun", "dog", "--model", tiny_blip]) == 0
    texts = {p.name: p.read_text() for p in folder.glob("*.txt")}
    assert len(texts) == len(list(folder.glob("*.png")))
    assert texts[first.with_suffix(".txt").name] == "my own words about {V} {C}\n"  # kept
    assert all("{V} {C}" in t for t in texts.values())
    rendered = prompt_for_image(sorted(folder.glob("*.png"))[1], "a photo of {V} {C}", "sks", "dog")
    assert "sks dog" in rendered and "{V}" not in rendered
    assert "wrote 2 caption files" in capsys.readouterr().out
    caption.main([str(folder), "--class-noun", "dog", "--model", tiny_blip, "--overwrite"])
    assert first.with_suffix(".txt").read_text() != "my own words about {V} {C}\n"


def test_missing_captioner_is_a_clear_error(concept_dir, capsys):
    assert caption.main([str(concept_dir), "--class-noun", "dog", "--model", "nobody/no-such-captioner"]) == 2
    assert "captioning model" in capsys.readouterr().err


def test_toy_oracle_captions_describe_toy_renders(tmp_path):
    """On the toy world the oracle's readings give the world's own captions."""
    from t2i_personal.toyworld import world

    rng = random.Random(3)
    scenes = [world.sample_scene(rng, cls=cls, accessory_rate=0.0) for cls in ("dog", "cat", "car", "vase")] * 2
    images = [Image.fromarray(world.render(s).image) for s in scenes]
    captions = caption.ToyOracleCaptioner()(images)
    exact = sum(c == world.describe(s, full=True) for c, s in zip(captions, scenes))
    assert exact >= 6, list(zip(captions, [world.describe(s, full=True) for s in scenes]))
