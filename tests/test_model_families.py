"""The model-family layer (``t2i_personal/families``) against diffusers' own code.

* conditioning: a family's ``encode`` / ``add_image_conditioning`` give what its diffusers pipeline computes;
* training: the DDPM objective's noisy input, target and min-SNR weights are diffusers' scheduler functions;
* recognition: pipeline class names, denoisers, original-layout single files, unknown family names;
* compatibility: results trained before the family layer (``personalization.json`` format 1, written by commit
  0ee4ff5) still load and give the same image (``tests/artifacts/results-v1``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import compute_snr
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from t2i_personal.config import ModelConfig, TrainingConfig, load_config
from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.families import (
    FAMILIES,
    family_named,
    family_of_denoiser,
    family_of_pipeline,
    family_of_pipeline_class,
    family_of_single_file,
)
from t2i_personal.models.loading import load_components
from t2i_personal.models.single_file import save_original_sd_checkpoint, save_original_sdxl_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESULTS_V1 = Path(__file__).resolve().parent / "artifacts" / "results-v1"
PROMPTS = ["a photo of sks dog", "an oil painting of a cat on the beach"]


# ------------------------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd2"])
def test_sd_conditioning_is_the_pipelines(comps, name):
    c = comps(name)
    pipe = c.pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    with torch.no_grad():
        cond = c.encode(c.tokenize(PROMPTS))
        expected, negative = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
    assert negative is None
    assert cond.encoder_hidden_states.shape == (2, 77, c.text_encoder.config.hidden_size)
    torch.testing.assert_close(cond.encoder_hidden_states, expected, rtol=0, atol=0)
    assert cond.pooled is None and cond.time_ids is None
    # SD has no image-dependent conditioning
    sized = c.family.add_image_conditioning(cond, [(40, 56), (64, 64)], [(3, 5), (0, 0)], (32, 32))
    assert sized.time_ids is None


def test_sdxl_conditioning_is_the_pipelines(comps):
    c = comps("tiny-sdxl")
    pipe = c.pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    with torch.no_grad():
        cond = c.encode(c.tokenize(PROMPTS))
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)
    assert neg is None and neg_pooled is None
    # penultimate states of both encoders concatenated (32 + 48), pooled projection of the second (48)
    assert cond.encoder_hidden_states.shape == (2, 77, 80)
    assert cond.pooled.shape == (2, 48)
    torch.testing.assert_close(cond.encoder_hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.time_ids is None  # added by add_image_conditioning

    sizes, crops, target = [(40, 56), (64, 64)], [(3, 5), (0, 0)], (32, 32)
    cond = c.family.add_image_conditioning(cond, sizes, crops, target)
    dtype = cond.encoder_hidden_states.dtype
    expected = torch.cat([
        pipe._get_add_time_ids(size, crop, target, dtype=dtype,
                               text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        for size, crop in zip(sizes, crops)])
    torch.testing.assert_close(cond.time_ids, expected, rtol=0, atol=0)
    assert cond.time_ids.tolist() == [[40, 56, 3, 5, 32, 32], [64, 64, 0, 0, 32, 32]]

    # and the family feeds the denoiser the way the pipeline does
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ours = c.family.denoise(c.unet, latents, t, cond)
        theirs = pipe.unet(latents, t, encoder_hidden_states=embeds,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": expected}).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_conditioning_select_picks_rows(comps):
    c = comps("tiny-sdxl")
    with torch.no_grad():
        cond = c.family.add_image_conditioning(c.encode(c.tokenize(PROMPTS)), [(40, 56), (64, 64)],
                                               [(3, 5), (0, 0)], (32, 32))
    picked = cond.select(torch.tensor([False, True]))
    for field in ("encoder_hidden_states", "pooled", "time_ids"):
        assert torch.equal(getattr(picked, field), getattr(cond, field)[1:])


# ------------------------------------------------------------------------------------------- training objective


@pytest.mark.parametrize("name, prediction", [("tiny-sd", "epsilon"), ("tiny-sd2", "v_prediction"),
                                              ("tiny-sdxl", "epsilon")])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_objective_is_diffusers_ddpm(comps, name, prediction, snr_gamma):
    c = comps(name)
    assert c.scheduler.config.prediction_type == prediction
    objective = c.family.objective(c, TrainingConfig(snr_gamma=snr_gamma))
    bsz = 8
    latents = torch.randn(bsz, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(1234)
    batch = objective(latents)
    # the draws of DDPMObjective.__call__, in its order: noise, then timesteps
    torch.manual_seed(1234)
    noise = torch.randn(latents.shape)
    timesteps = torch.randint(0, 1000, (bsz,)).long()

    ref = DDPMScheduler.from_config(c.scheduler.config)
    assert ref.config.num_train_timesteps == 1000
    assert torch.equal(batch.timesteps, timesteps)
    torch.testing.assert_close(batch.noisy_latents, ref.add_noise(latents, noise, timesteps), rtol=0, atol=0)
    expected_target = noise if prediction == "epsilon" else ref.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(batch.target, expected_target, rtol=0, atol=0)
    if prediction == "v_prediction":  # a v target is not the noise
        assert not torch.allclose(batch.target, noise, atol=1e-2)

    # the noise is recoverable from the noisy input: x_t = sqrt(a) x + sqrt(1 - a) eps
    alpha = ref.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    recovered = (batch.noisy_latents - alpha.sqrt() * latents) / (1 - alpha).sqrt()
    torch.testing.assert_close(recovered, noise, rtol=1e-4, atol=1e-4)

    # min-SNR-gamma weights as diffusers' train_dreambooth_lora computes them
    assert batch.loss_weights.shape == (bsz,)
    if snr_gamma is None:
        assert torch.equal(batch.loss_weights, torch.ones(bsz))
    else:
        snr = compute_snr(ref, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / (snr if prediction == "epsilon" else snr + 1)
        torch.testing.assert_close(batch.loss_weights, weights)
        assert (batch.loss_weights <= 1).all() and not torch.equal(batch.loss_weights, torch.ones(bsz))


def test_objective_noise_offset(comps):
    c = comps("tiny-sd")
    objective = c.family.objective(c, TrainingConfig(noise_offset=0.1))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    batch = objective(latents)
    torch.manual_seed(7)
    noise = torch.randn(latents.shape) + 0.1 * torch.randn(4, 4, 1, 1)
    timesteps = torch.randint(0, 1000, (4,)).long()
    ref = DDPMScheduler.from_config(c.scheduler.config)
    assert torch.equal(batch.timesteps, timesteps)
    torch.testing.assert_close(batch.target, noise, rtol=0, atol=0)
    torch.testing.assert_close(batch.noisy_latents, ref.add_noise(latents, noise, timesteps), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- recognition


def test_family_of_pipeline_class():
    assert family_of_pipeline_class("StableDiffusionPipeline").name == "sd"
    assert family_of_pipeline_class("StableDiffusionImg2ImgPipeline").name == "sd"
    assert family_of_pipeline_class("StableDiffusionXLPipeline").name == "sdxl"
    assert family_of_pipeline_class("StableDiffusionXLImg2ImgPipeline").name == "sdxl"
    with pytest.raises(ModelLoadError, match="KandinskyPipeline.*flux, sd, sd3, sdxl"):
        family_of_pipeline_class("KandinskyPipeline")


def test_family_of_denoiser_and_pipeline(comps):
    for name, family in [("tiny-sd", "sd"), ("tiny-sd2", "sd"), ("tiny-sdxl", "sdxl")]:
        c = comps(name)
        assert c.family.name == family
        assert family_of_denoiser(c.unet) is c.family is FAMILIES[family]
        assert family_of_pipeline(c.pipeline()) is c.family


def test_family_of_denoiser_refuses_other_modules():
    with pytest.raises(ModelLoadError, match="Linear"):
        family_of_denoiser(torch.nn.Linear(2, 2))


def test_unknown_family_names_are_refused():
    assert family_named("sd").name == "sd" and family_named("sdxl").name == "sdxl"
    with pytest.raises(ModelLoadError, match=r"unknown model family 'nope'; known: flux, sd, sd3, sdxl"):
        family_named("nope")
    assert ModelConfig(family="sdxl").family == "sdxl"
    with pytest.raises(ValidationError, match=r"unknown model family 'kandinsky'.*flux, sd, sd3, sdxl"):
        ModelConfig(family="kandinsky")
    assert ModelConfig(family="flux").family == "flux"
    base = {"model": {"family": "kandinsky"},
            "concepts": [{"identifier": "sks", "class_noun": "dog", "instance_dir": "photos"}]}
    with pytest.raises(ConfigError, match=r"model\.family.*unknown model family 'kandinsky'.*flux, sd, sd3, sdxl"):
        load_config(base=base)


def test_declared_family_must_match_the_model():
    with pytest.raises(ModelLoadError, match="'sdxl'.*'sd' model"):
        load_components(ModelConfig(pretrained="builtin:tiny-sd", family="sdxl"))


def test_single_file_family(comps, tmp_path):
    files = {
        "sd": save_original_sd_checkpoint(*(getattr(comps("tiny-sd"), n) for n in ("unet", "vae", "text_encoder")),
                                          tmp_path / "sd.safetensors", dtype=torch.float16),
        "sd2": save_original_sd_checkpoint(*(getattr(comps("tiny-sd2"), n) for n in ("unet", "vae", "text_encoder")),
                                           tmp_path / "sd2.safetensors", dtype=torch.float16),
        "sdxl": save_original_sdxl_checkpoint(
            *(getattr(comps("tiny-sdxl"), n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")),
            tmp_path / "sdxl.safetensors", dtype=torch.float16),
    }
    keys = {}
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            keys[name] = set(f.keys())
    assert family_of_single_file(keys["sd"]).name == "sd"
    assert family_of_single_file(keys["sd2"]).name == "sd"
    assert family_of_single_file(keys["sdxl"]).name == "sdxl"
    # the SDXL file also has the SD UNet prefix: SDXL must not claim SD files, SD does claim SDXL's
    assert not FAMILIES["sdxl"].claims_single_file(keys["sd"]) and not FAMILIES["sdxl"].claims_single_file(keys["sd2"])
    assert FAMILIES["sd"].claims_single_file(keys["sdxl"])


# ------------------------------------------------------------------------------------------- adapters, attention


def test_attention_module_names(comps):
    from diffusers.models.attention_processor import Attention

    for name in ("tiny-sd", "tiny-sdxl"):
        unet = comps(name).unet
        family = comps(name).family
        attention = [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention)]
        cross = family.cross_attention_modules(unet)
        assert cross and set(cross) == {n for n, m in attention if m.is_cross_attention}
        assert all(unet.get_submodule(n) is m for n, m in cross.items())
        assert family.self_attention_names(unet) == [n for n, m in attention if not m.is_cross_attention]


def test_kohya_lora_keys():
    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    assert family_named("sd").kohya_lora_key(key) == key.replace("lora_te1_", "lora_te_")
    assert family_named("sdxl").kohya_lora_key(key) == key
    unet_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    assert family_named("sd").kohya_lora_key(unet_key) == unet_key


# ------------------------------------------------------------------------------------------- results trained before


def _render(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.mark.parametrize("result, prompt", [("lora-tiny-sd", "a photo of sks dog"),
                                            ("tokens-tiny-sd", "a photo of <new1> dog")])
def test_format_1_results_still_load(comps, tmp_path, result, prompt):
    """Trained and rendered by commit 0ee4ff5 (before the family layer): 2 steps on builtin:tiny-sd at 32 px,
    weights saved in float16; only personalization.json, the files it names and the image were kept."""
    import json

    from t2i_personal import load_personalized

    source = RESULTS_V1 / result
    assert (source / "personalization.json").is_file(), f"{source} is missing (tests/artifacts is in .gitignore?)"
    folder = shutil.copytree(source, tmp_path / result)
    record = json.loads((folder / "personalization.json").read_text())
    assert record["format_version"] == 1 and record["base_model"]["pretrained"] == "builtin:tiny-sd"
    # the training machine's paths are recorded, never read: point them nowhere
    gone = str(tmp_path / "gone")
    record["config"]["training"]["output_dir"] = gone
    for concept in record["config"]["concepts"]:
        concept["instance_dir"] = gone
    (folder / "personalization.json").write_text(json.dumps(record))

    pipe = load_personalized(folder)
    assert family_of_pipeline(pipe).name == "sd"
    image = _render(pipe, prompt)
    expected = np.load(folder / "expected.npy").astype(np.float32)
    assert image.shape == expected.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-3)

    if record["artifact"]["type"] == "lora":  # the adapter is applied, not silently dropped
        base = _render(comps("tiny-sd").pipeline(), prompt)
        assert np.abs(base - expected).max() > 1e-2
    else:  # the learned embedding is the token's row of the text encoder
        (path,) = [t["path"] for t in record["artifact"]["tokens"]]
        (vector,) = load_file(folder / path).values()
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<new1>")]
        torch.testing.assert_close(row.detach(), vector.reshape(-1).to(row.dtype), rtol=0, atol=0)
