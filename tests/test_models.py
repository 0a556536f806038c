"""Base-model loading through the same code a user runs: built-ins, diffusers folders, single files."""

import pytest
import torch

from conftest import base_config, run_training
from t2i_personal.config import ModelConfig
from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.models.loading import load_components
from t2i_personal.models.tokenizer import build_clip_tokenizer


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_offline_tokenizer_matches_open_clip():
    import open_clip

    text = "a photo of sks dog wearing sunglasses, on the beach! café"
    ours = build_clip_tokenizer()(text).input_ids
    reference = open_clip.get_tokenizer("ViT-B-32")([text])[0]
    assert ours == reference[: len(ours)].tolist() and reference[len(ours)] == 0
    assert len(build_clip_tokenizer()) == 49408


@pytest.mark.parametrize("name,family,encoders", [("tiny-sd", "sd", 1), ("tiny-sd2", "sd", 1), ("tiny-sdxl", "sdxl", 2)])
def test_builtins_are_seeded_and_round_trip_through_a_diffusers_folder(name, family, encoders, tmp_path):
    a, b = load_components(f"builtin:{name}"), load_components(f"builtin:{name}")
    assert a.family.name == family and len(a.text_encoders) == encoders
    assert same_weights(a.unet, b.unet), "built-ins must be identical on every machine"
    a.pipeline().save_pretrained(tmp_path / name)
    loaded = load_components(str(tmp_path / name))
    assert loaded.family.name == family and type(loaded.scheduler) is type(a.scheduler)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, part) is not None:
            assert same_weights(getattr(a, part), getattr(loaded, part)), part
    assert loaded.tokenizer("a sks dog").input_ids == a.tokenizer("a sks dog").input_ids


def test_sdxl_conditioning_has_pooled_embeds_and_time_ids():
    comps = load_components("builtin:tiny-sdxl")
    cond = comps.encode(comps.tokenize(["a photo of sks dog"]))
    hidden, pooled = cond.encoder_hidden_states, cond.pooled
    assert hidden.shape[-1] == comps.unet.config.cross_attention_dim
    assert pooled.shape == (1, comps.text_encoder_2.config.projection_dim)


def test_prompt_over_the_window_is_rejected():
    comps = load_components("builtin:tiny-sd")
    with pytest.raises(ConfigError, match="at most 77"):
        comps.tokenize(["dog " * 80])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_full_finetune_single_file_export_loads_through_our_loader(name, concept_dir, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(concept_dir, out, model={"pretrained": f"builtin:{name}"},
                      method={"name": "dreambooth", "adapter": "full"}, export={"single_file": True})
    trainer = run_training(cfg)
    assert (out / "model.safetensors").is_file()
    loaded = load_components(ModelConfig(pretrained=str(out / "model.safetensors"), config_dir=str(out)))
    assert loaded.family == trainer.components.family
    assert same_weights(loaded.unet, trainer.components.unet)
    assert same_weights(loaded.text_encoder, trainer.components.text_encoder)


def test_single_file_without_configs_explains_config_dir(tmp_path, monkeypatch):
    from t2i_personal.models.single_file import save_original_sd_checkpoint

    comps = load_components("builtin:tiny-sd")
    path = save_original_sd_checkpoint(comps.unet, comps.vae, comps.text_encoder, tmp_path / "m.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model.config_dir"):
        load_components(str(path))


def test_family_mismatch_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="model.family"):
        load_components(ModelConfig(pretrained="builtin:tiny-sd", family="sdxl"))


def test_hub_id_resolves_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    """A hub id is loaded through huggingface_hub's cache layout (what a download leaves), with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--t2i-test--tiny-sd"
    load_components("builtin:tiny-sd").pipeline().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    comps = load_components("t2i-test/tiny-sd")
    assert comps.family.name == "sd" and comps.source == "t2i-test/tiny-sd"
    assert same_weights(comps.unet, load_components("builtin:tiny-sd").unet)
