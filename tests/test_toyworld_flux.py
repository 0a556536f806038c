"""The toy world's FLUX generator (``builtin:toy-flux``): its tokenizers, its pretraining entry point, the shipped
folder loading through plain diffusers and through the toolkit, and what its generations mean."""

from __future__ import annotations

import json

import pytest
import torch

from t2i_personal.toyworld import flux_generator, world


@pytest.fixture(scope="module")
def tokenizers():
    return flux_generator.build_tokenizers()


def test_world_clip_vocabulary_splits_every_world_word_as_clip_does(tokenizers):
    from t2i_personal.models.tokenizer import build_clip_tokenizer

    clip, _ = tokenizers
    full = build_clip_tokenizer()
    texts = list(flux_generator.corpus(n=300, seed=7)) + ["a photo of sks dog wearing a red hat, on the beach!"]
    assert all(clip.tokenize(t) == full.tokenize(t) for t in texts)
    assert len(clip) < 3000 and clip.bos_token_id == len(clip) - 2 and clip.eos_token_id == len(clip) - 1
    unseen = "a zebra xylophone"  # words the world never uses still tokenize, into smaller pieces
    ids = clip(unseen).input_ids
    assert clip.decode(ids, skip_special_tokens=True).strip() == unseen and clip.unk_token_id not in ids[1:-1]


def test_world_t5_tokenizer_has_t5s_conventions_and_the_trained_window(tokenizers):
    _, t5 = tokenizers
    ids = t5("a blue striped cat in the snow").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0 and t5.unk_token_id not in ids
    assert t5.model_max_length == flux_generator.architecture()["t5_window"] == 32
    assert len(t5("a photo of a red dog on the grass").input_ids) <= 12  # whole words, not letters


def test_world_tokenizers_tokenize_alike_after_a_save_and_load(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    texts = ["a photo of sks dog wearing a red hat, on the beach!", "A Photo of SKS Dog", "a  zebra\tvase", ""]
    for i, tokenizer in enumerate(tokenizers):
        tokenizer.save_pretrained(tmp_path / str(i))
        again = AutoTokenizer.from_pretrained(tmp_path / str(i))
        assert [again(t).input_ids for t in texts] == [tokenizer(t).input_ids for t in texts]
        assert again.model_max_length == tokenizer.model_max_length


def test_the_flux_family_reads_a_short_t5_window_from_the_tokenizer():
    from t2i_personal.models.loading import load_components

    c = load_components("builtin:tiny-flux")  # its own copy: this test changes the tokenizer and extras
    assert c.family.max_sequence_length(c) == 512  # FLUX's default with a full-size tokenizer
    c.tokenizer_2.model_max_length = 32
    assert c.family.max_sequence_length(c) == 32
    assert c.family.pipeline_call_kwargs(c) == {"max_sequence_length": 32}
    c.extras["max_sequence_length"] = 48  # training.max_sequence_length still decides when given
    assert c.family.max_sequence_length(c) == 48


@pytest.mark.slow
def test_flux_pretraining_writes_a_plain_flux_folder_and_can_continue(tmp_path):
    from diffusers import FluxPipeline

    from t2i_personal.models.loading import load_components

    small = dict(num_images=32, captions_per_image=2, steps=4, batch_size=4, workers=1, sample_steps=2,
                 distill_fraction=0.5)
    first = flux_generator.train(tmp_path / "a", **small)
    assert first["steps_run"] == 4 and first["distill_steps_run"] >= 1
    assert "pretrain generator-flux" in first["reproduce"] and "time_budget_s=null" in first["reproduce"]
    for name in ("training.json", "loss.png", "samples.png", "model_index.json"):
        assert (tmp_path / "a" / name).is_file()
    pipe = FluxPipeline.from_pretrained(tmp_path / "a")
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float32
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.shift_factor is not None
    comps = load_components(str(tmp_path / "a"))
    assert comps.family.name == "flux" and comps.family.max_sequence_length(comps) == 32

    second = flux_generator.train(tmp_path / "b", **{**small, "steps": 1}, init_from=str(tmp_path / "a"))
    assert second["previous"]["steps_run"] == 4 and "init_from" in second["reproduce"]
    again = FluxPipeline.from_pretrained(tmp_path / "b")
    assert again.vae.config.scaling_factor == pipe.vae.config.scaling_factor  # the latent space is kept
    assert not torch.equal(again.transformer.proj_out.weight, pipe.transformer.proj_out.weight)


def test_shipped_toy_flux_loads_in_plain_diffusers_and_as_the_flux_family():
    from diffusers import FluxPipeline

    from t2i_personal.models.loading import load_components, peek_family

    pipe = FluxPipeline.from_pretrained(flux_generator.WEIGHTS)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float32
    assert peek_family("builtin:toy-flux") == "flux"
    comps = load_components("builtin:toy-flux")
    assert comps.family.name == "flux" and comps.source == "builtin:toy-flux"
    assert comps.family.max_sequence_length(comps) == 32
    record = json.loads((flux_generator.WEIGHTS / "training.json").read_text())
    assert record["steps_run"] > 0 and "pretrain generator-flux" in record["reproduce"]
    assert (flux_generator.WEIGHTS / "samples.png").is_file() and (flux_generator.WEIGHTS / "loss.png").is_file()


def test_toy_flux_generations_follow_the_prompt():
    from t2i_personal.toyworld.gates import generate
    from t2i_personal.toyworld.oracle import Oracle

    asked = [world.Scene(cls=c, colour=k, scene=s) for c, k, s in (
        ("dog", "red", "grass"), ("car", "yellow", "city street"), ("vase", "green", "wooden floor"),
        ("teddy bear", "brown", "beach"), ("cat", "blue", "snow"), ("face", "red", "grass"))]
    images = generate([world.describe(s, full=True) for s in asked], steps=15, seed=0,
                      pretrained="builtin:toy-flux")
    readings = Oracle.from_pretrained().read(images)
    correct = sum(r["cls"] == s.cls for r, s in zip(readings, asked))
    assert correct >= 4, [r["cls"] for r in readings]  # chance is 1 in 6
    assert images.std() > 20
