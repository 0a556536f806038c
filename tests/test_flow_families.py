"""The flow-matching families (``families/sd3.py``, ``families/flux.py``) end to end on the tiny built-in models.

* conditioning and the transformer call equal what diffusers' own pipelines compute for the same inputs;
* every method trains a few steps (Custom Diffusion: the text tokens' K/V projections of joint attention);
* exports reload in plain diffusers (a process that never imports t2i_personal) and reproduce the tuned image:
  the diffusers LoRA file, FLUX's kohya file (through diffusers' own kohya-FLUX conversion), a full pipeline;
* resuming from a checkpoint gives the uninterrupted run's weights bit for bit;
* bad input (a prompt over T5's window, DDPM options, an SDXL LoRA on a FLUX base) gets a clear error.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file

from conftest import assert_resume_is_exact, base_config, run_training
from t2i_personal import load_personalized
from t2i_personal.inference.pipeline import default_guidance
from t2i_personal.config import ModelConfig, TrainingConfig
from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.families import family_of_pipeline_class, family_of_single_file
from t2i_personal.families.flow_matching import FlowMatchingObjective
from t2i_personal.models.loading import load_components, peek_family
from test_exports import plain_diffusers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a photo of sks dog"
FLOW_MODELS = ["tiny-flux", "tiny-sd3"]


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-bases")
    for name in ("tiny-flux", "tiny-sd3", "tiny-sdxl"):
        load_components(f"builtin:{name}").pipeline().save_pretrained(root / name)
    return root


def flow_config(concept_dir, out_dir, model="builtin:tiny-flux", **sections) -> dict:
    cfg = base_config(concept_dir, out_dir, model={"pretrained": model}, **sections)
    cfg["training"]["train_batch_size"] = 1
    return cfg


def generate(pipe, prompt: str = PROMPT) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images


# ------------------------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux-schnell", "tiny-sd3"])
def test_conditioning_is_the_pipelines(comps, name):
    c = comps(name)
    pipe = c.pipeline()
    cond = c.encode(c.tokenize([PROMPT, "an oil painting of a cat"]))
    if c.family.name == "flux":
        embeds, pooled, text_ids = pipe.encode_prompt([PROMPT, "an oil painting of a cat"], None)
        assert text_ids.shape == (512, 3) and not text_ids.any()
    else:
        embeds, _, pooled, _ = pipe.encode_prompt([PROMPT, "an oil painting of a cat"], None, None,
                                                  do_classifier_free_guidance=False)
    assert torch.equal(cond.encoder_hidden_states, embeds)
    assert torch.equal(cond.pooled, pooled)


def test_flux_transformer_call_is_the_pipelines(comps):
    """Packing, position ids, t/1000 and the guidance embedding as FluxPipeline calls the transformer."""
    c = comps("tiny-flux")
    cond = c.encode(c.tokenize([PROMPT, PROMPT]))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([250.0, 900.0])
    cond = cond.replace(guidance=torch.full((2,), 3.5))
    ours = c.family.denoise(c.transformer, latents, t, cond)
    packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 8)
    expected = c.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), 3.5),
                             pooled_projections=cond.pooled, encoder_hidden_states=cond.encoder_hidden_states,
                             txt_ids=torch.zeros(512, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                             return_dict=False)[0]
    assert torch.equal(ours, FluxPipeline._unpack_latents(expected, 8, 8, 1))
    assert ours.shape == latents.shape
    other = c.family.denoise(c.transformer, latents, t, cond.replace(guidance=torch.full((2,), 1.0)))
    assert not torch.equal(ours, other)  # the guidance value reaches the model


def test_guidance_is_trained_for_dev_and_refused_for_schnell(comps):
    dev, schnell = comps("tiny-flux"), comps("tiny-flux-schnell")
    assert dev.family.training_guidance(dev.transformer, TrainingConfig()) == 3.5
    assert dev.family.training_guidance(dev.transformer, TrainingConfig(guidance_scale=1.0)) == 1.0
    assert schnell.family.training_guidance(schnell.transformer, TrainingConfig()) is None
    with pytest.raises(ConfigError, match="no guidance embedding"):
        schnell.family.training_guidance(schnell.transformer, TrainingConfig(guidance_scale=3.5))


def test_family_objective_defaults_are_diffusers_scripts(comps):
    flux, sd3 = comps("tiny-flux"), comps("tiny-sd3")
    assert flux.family.objective(flux, TrainingConfig()).describe()["timestep_sampling"] == "uniform"
    assert sd3.family.objective(sd3, TrainingConfig()).describe()["timestep_sampling"] == "logit_normal"
    custom = TrainingConfig.model_validate({"flow_matching": {"timestep_sampling": "mode", "loss_weighting": "cosmap",
                                                              "shift": 3.0}})
    described = flux.family.objective(flux, custom).describe()
    assert (described["timestep_sampling"], described["loss_weighting"], described["shift"]) == ("mode", "cosmap", 3.0)


def test_resolution_shift_is_fluxs_inference_shift(comps):
    """shift: resolution moves σ as FLUX's scheduler does at inference for the same number of image tokens."""
    c = comps("tiny-flux")
    objective = FlowMatchingObjective(c.scheduler.config, shift="resolution", patch_size=2)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    mu = calculate_shift(64 * 64 // 4, 256, 4096, 0.5, 1.15)
    expected = FlowMatchEulerDiscreteScheduler.from_config(c.scheduler.config).time_shift(mu, 1.0, sigmas)
    assert torch.allclose(objective.shifted(sigmas, (64, 64)), expected.float())
    fixed = FlowMatchingObjective(c.scheduler.config, shift=3.0).shifted(sigmas, (8, 8))
    assert torch.allclose(fixed, 3 * sigmas / (1 + 2 * sigmas))
    torch.manual_seed(0)
    noised = objective(torch.randn(4, 4, 64, 64))
    assert torch.allclose(noised.timesteps, noised.sigmas.flatten() * 1000)


def test_recognition():
    assert family_of_pipeline_class("FluxPipeline").name == "flux"
    assert family_of_pipeline_class("StableDiffusion3Pipeline").name == "sd3"
    assert family_of_pipeline_class("StableDiffusionPipeline").name == "sd"
    assert family_of_single_file({"double_blocks.0.img_attn.qkv.weight"}).name == "flux"
    assert family_of_single_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}).name == "sd3"
    assert family_of_single_file({"model.diffusion_model.input_blocks.0.0.weight"}).name == "sd"


def test_resolution_must_fit_the_packing(comps):
    """FLUX packs 2×2 latent cells and SD3 patches them: sides must be a multiple of VAE factor × patch (16 on the
    real models, 8 on the tiny ones with their 4× VAE)."""
    flux, sd3, sd = comps("tiny-flux"), comps("tiny-sd3"), comps("tiny-sd")
    assert flux.family.pixel_multiple(flux) == sd3.family.pixel_multiple(sd3) == 8 and sd.family.pixel_multiple(sd) == 4
    flux.family.check_resolution(flux, 40)
    with pytest.raises(ConfigError, match="multiple of 8.*try 48"):
        flux.family.check_resolution(flux, 44)


def test_peek_family_reads_configs_only(saved_bases):
    assert peek_family("builtin:tiny-flux") == "flux" and peek_family("builtin:toy") == "sd"
    assert peek_family(str(saved_bases / "tiny-sd3")) == "sd3"
    assert peek_family("nobody/not-in-the-cache") is None and peek_family("model.safetensors") is None


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_lora_with_text_encoder_and_class_images(model, concept_dir, tmp_path):
    cfg = flow_config(concept_dir, tmp_path / "out", f"builtin:{model}",
                      method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": True, "prior": "class_images"},
                      validation={"prompts": ["a {V} {C} on the beach"], "every_n_steps": 3, "num_inference_steps": 2,
                                  "num_images_per_prompt": 1})
    trainer = run_training(cfg)
    record = json.loads((tmp_path / "out" / "personalization.json").read_text())
    assert record["family"] == model.split("-")[1]
    assert record["resolved"]["objective"]["objective"] == "flow_matching"
    assert set(trainer.last_logs) >= {"denoise", "prior", "loss"} and math.isfinite(trainer.last_logs["loss"])
    lora = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("transformer.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)
    assert not any(k.startswith(("text_encoder_3.", "text_encoder_2.")) and model == "tiny-flux" for k in lora)  # T5 frozen
    assert (tmp_path / "out" / "validation" / "step-000003.png").is_file()
    pipe = load_personalized(tmp_path / "out")
    assert generate(pipe).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_full_finetune_with_base_prediction_prior(model, concept_dir, tmp_path):
    cfg = flow_config(concept_dir, tmp_path / "out", f"builtin:{model}",
                      method={"name": "dreambooth", "adapter": "full", "prior": "base_prediction"})
    trainer = run_training(cfg)
    assert trainer.last_logs["prior"] > 0
    tuned = load_personalized(tmp_path / "out")
    base = load_components(f"builtin:{model}")
    changed = [n for n, p in tuned.transformer.named_parameters()
               if not torch.equal(p, dict(base.transformer.named_parameters())[n])]
    assert changed


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_learned_tokens_with_spl(model, concept_dir, tmp_path):
    cfg = flow_config(concept_dir, tmp_path / "out", f"builtin:{model}",
                      method={"name": "dreambooth", "adapter": "lora", "spl": {"weight": 1.0}})
    cfg["concepts"][0].update(identifier="<new1>", initializer_token="dog")
    trainer = run_training(cfg)
    assert trainer.last_logs["spl"] >= 0
    record = json.loads((tmp_path / "out" / "personalization.json").read_text())
    assert record["artifact"]["tokens"]
    pipe = load_personalized(tmp_path / "out")
    assert "<new1>" in pipe.tokenizer.get_vocab()
    assert generate(pipe).shape == (1, 32, 32, 3)


def test_styleforge_with_two_concepts_on_flux(concept_dir, tmp_path):
    cfg = flow_config(concept_dir, tmp_path / "out", method={"name": "styleforge", "adapter": "lora"})
    cfg["concepts"] = [
        {"identifier": "sks", "class_noun": "style", "instance_dir": str(concept_dir), "class_dir": str(concept_dir),
         "instance_prompt": "a photo of {V} {C}", "class_prompt": "a photo of {C}"},
        {"identifier": "zwx", "class_noun": "style", "instance_dir": str(concept_dir), "class_dir": str(concept_dir)},
    ]
    trainer = run_training(cfg)
    assert {"denoise", "prior"} <= set(trainer.last_logs)


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_custom_diffusion_tunes_the_text_kv_of_joint_attention(model, concept_dir, tmp_path):
    """The analogue of cross-attention K/V: only the text tokens' add_k_proj / add_v_proj change, and the saved
    weights reproduce the tuned model."""
    cfg = flow_config(concept_dir, tmp_path / "out", f"builtin:{model}", method={"name": "custom_diffusion"})
    cfg["training"]["learning_rate"] = 5e-2
    trainer = run_training(cfg)
    tuned = generate(trainer.components.pipeline())
    base = dict(load_components(f"builtin:{model}").transformer.named_parameters())
    changed = {n for n, p in trainer.components.transformer.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in changed)
    record = json.loads((tmp_path / "out" / "personalization.json").read_text())
    assert record["artifact"]["attention"] == "joint"
    np.testing.assert_allclose(generate(load_personalized(tmp_path / "out")), tuned, atol=1e-5)


def test_custom_diffusion_crossattn_is_refused_on_joint_attention(concept_dir, tmp_path):
    cfg = flow_config(concept_dir, tmp_path / "out",
                      method={"name": "custom_diffusion", "custom_diffusion_params": "crossattn"})
    with pytest.raises(ConfigError, match="self-attention"):
        run_training(cfg)
    assert not (tmp_path / "out").exists()


def assert_flux_resume_is_exact(concept_dir, tmp_path, method: dict, quantize: str = "none") -> None:
    def config(out, **training):
        cfg = flow_config(concept_dir, out, method=method)
        cfg["model"]["quantize"] = quantize
        cfg["training"].update(max_train_steps=4, checkpointing_steps=2, **training)
        return cfg

    assert_resume_is_exact(config, tmp_path)


def test_resume_is_exact(concept_dir, tmp_path):
    assert_flux_resume_is_exact(concept_dir, tmp_path, {"name": "dreambooth", "adapter": "lora", "train_text_encoder": True})


# ------------------------------------------------------------------------------------------- exports


def test_flux_lora_files_reload_in_plain_diffusers(saved_bases, concept_dir, tmp_path):
    """The diffusers file and the kohya file (through diffusers' kohya-FLUX conversion) give the tuned image.
    Double-block targets only: diffusers' converter reads single-block ``linear1`` at FLUX.1's widths only."""
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
               "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_q_proj",
               "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
               "transformer_blocks.0.ff.net.2"]
    cfg = flow_config(concept_dir, tmp_path / "out", str(saved_bases / "tiny-flux"),
                      method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": True,
                              "lora": {"rank": 4, "alpha": 8, "unet_target_modules": targets}})
    cfg["training"]["learning_rate"] = 5e-2
    ours = generate(run_training(cfg).components.pipeline())  # the in-memory tuned model
    base, diffusers_file, kohya_file = plain_diffusers(tmp_path, saved_bases / "tiny-flux", tmp_path / "out",
                                                       "pytorch_lora_weights.safetensors",
                                                       "pytorch_lora_weights_kohya.safetensors")
    assert np.abs(ours - base).max() > 1e-3  # training changed the image
    np.testing.assert_allclose(diffusers_file, ours, atol=1e-5)
    np.testing.assert_allclose(kohya_file, ours, atol=1e-4)
    np.testing.assert_allclose(generate(load_personalized(tmp_path / "out")), ours, atol=1e-5)
    kohya = load_file(str(tmp_path / "out" / "pytorch_lora_weights_kohya.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert any(k.startswith("lora_te1_") for k in kohya)


def test_sd3_lora_and_full_pipeline_reload_in_plain_diffusers(saved_bases, concept_dir, tmp_path):
    lora = flow_config(concept_dir, tmp_path / "lora", str(saved_bases / "tiny-sd3"),
                       method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": True})
    lora["training"]["learning_rate"] = 5e-2
    lora_tuned = generate(run_training(lora).components.pipeline())
    full = flow_config(concept_dir, tmp_path / "full", str(saved_bases / "tiny-sd3"), method={"name": "dreambooth"})
    full_tuned = generate(run_training(full).components.pipeline())
    assert not (tmp_path / "lora" / "pytorch_lora_weights_kohya.safetensors").exists()  # SD3 UIs read diffusers'
    base, from_lora = plain_diffusers(tmp_path, saved_bases / "tiny-sd3", tmp_path / "lora",
                                      "pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(from_lora, lora_tuned, atol=1e-5)
    np.testing.assert_allclose(generate(load_personalized(tmp_path / "lora")), lora_tuned, atol=1e-5)
    assert np.abs(from_lora - base).max() > 1e-3
    _, from_folder = plain_diffusers(tmp_path, saved_bases / "tiny-sd3", tmp_path / "full", "pipeline")
    np.testing.assert_allclose(from_folder, full_tuned, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def test_prompt_over_t5_window_is_refused(concept_dir, tmp_path):
    cfg = flow_config(concept_dir, tmp_path / "out", training={"max_sequence_length": 4})
    with pytest.raises(ConfigError, match="reads at most 4"):
        run_training(cfg)


def test_generation_uses_the_t5_window_the_result_was_trained_with(concept_dir, tmp_path, comps):
    from t2i_personal.families import call_defaults
    from t2i_personal.inference.pipeline import load_personalized

    run_training(flow_config(concept_dir, tmp_path / "out", training={"max_sequence_length": 24}))
    assert call_defaults(load_personalized(tmp_path / "out")) == {"max_sequence_length": 24}
    assert call_defaults(comps("tiny-flux").pipeline()) == {"max_sequence_length": 512}  # FLUX's own default
    assert call_defaults(comps("tiny-sd").pipeline()) == {}


@pytest.mark.parametrize("training, match", [({"snr_gamma": 5.0}, "DDPM options"),
                                             ({"prediction_type": "v_prediction"}, "DDPM options")])
def test_ddpm_options_are_refused_on_flow_models(concept_dir, tmp_path, training, match):
    with pytest.raises(ConfigError, match=match):
        run_training(flow_config(concept_dir, tmp_path / "out", training=training))


def test_flow_options_are_refused_on_unet_models(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", training={"flow_matching": {"shift": 3.0}})
    with pytest.raises(ConfigError, match="flow-matching families"):
        run_training(cfg)


def test_sdxl_lora_on_a_flux_base_is_a_clear_error(saved_bases, concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", model={"pretrained": str(saved_bases / "tiny-sdxl")},
                      method={"name": "dreambooth", "adapter": "lora"})
    run_training(cfg)
    record_path = tmp_path / "out" / "personalization.json"
    record = json.loads(record_path.read_text())
    record["base_model"]["pretrained"] = str(saved_bases / "tiny-flux")
    record_path.write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="trained on another base model"):
        load_personalized(tmp_path / "out")


@pytest.mark.parametrize("model, key", [("tiny-flux", "double_blocks.0.img_attn.qkv.weight"),
                                        ("tiny-sd3", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight")])
def test_full_finetune_single_file_round_trip(model, key, saved_bases, concept_dir, tmp_path):
    """export.single_file writes the transformer in the original layout; model.pretrained reads it back with
    model.config_dir, giving the tuned model's image."""
    cfg = flow_config(concept_dir, tmp_path / "out", str(saved_bases / model), method={"name": "dreambooth"},
                      export={"single_file": True})
    tuned = generate(run_training(cfg).components.pipeline())
    single = tmp_path / "out" / "model.safetensors"
    assert key in load_file(str(single))
    components = load_components(ModelConfig(pretrained=str(single), config_dir=str(saved_bases / model)))
    assert components.family.name == model.split("-")[1]
    np.testing.assert_allclose(generate(components.pipeline()), tuned, atol=1e-5)
    with pytest.raises(ModelLoadError, match="config_dir"):
        load_components(ModelConfig(pretrained=str(single)))


# ------------------------------------------------------------------------------------------- quantized base (QLoRA)


@pytest.mark.parametrize("kind, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt"), ("torchao_int8", "Linear")])
def test_lora_on_a_quantized_base(kind, layer, concept_dir, tmp_path):
    """The frozen denoiser's block linears are quantized (peft wraps them), the LoRA trains and its export applies
    to the unquantized base."""
    cfg = flow_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora"},
                      training={"mixed_precision": "bf16", "learning_rate": 5e-2})
    cfg["model"]["quantize"] = kind
    trainer = run_training(cfg)
    base = trainer.components.transformer.transformer_blocks[0].ff.net[2].base_layer
    assert type(base).__name__ == layer
    if kind == "torchao_int8":
        assert type(base.weight).__name__ == "Int8Tensor"
    lora = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert generate(load_personalized(tmp_path / "out")).shape == (1, 32, 32, 3)


def test_quantized_base_resumes_exactly(concept_dir, tmp_path):
    assert_flux_resume_is_exact(concept_dir, tmp_path, {"name": "dreambooth", "adapter": "lora"}, quantize="nf4")


def test_quantized_base_needs_lora(concept_dir, tmp_path):
    cfg = flow_config(concept_dir, tmp_path / "out")
    cfg["model"]["quantize"] = "nf4"
    with pytest.raises(Exception, match="only a LoRA can"):
        run_training(cfg)


def test_learned_tokens_in_t5_reload_through_diffusers_loader(saved_bases, concept_dir, tmp_path):
    """training.learn_tokens_in_t5: the identifier gets a CLIP and a T5 row (saved as clip_l / t5, as diffusers'
    advanced FLUX script); the T5 row trains, and diffusers' textual-inversion loader (FluxPipeline's, with each
    encoder and tokenizer) reproduces the tuned image."""
    cfg = flow_config(concept_dir, tmp_path / "out", str(saved_bases / "tiny-flux"),
                      method={"name": "dreambooth", "adapter": "lora", "train_unet": False},
                      training={"learn_tokens_in_t5": True, "learning_rate": 5e-2})
    cfg["concepts"][0].update(identifier="<new1>", initializer_token="dog")
    trainer = run_training(cfg)
    t5 = trainer.components.text_encoder_2.get_input_embeddings()
    dog = trainer.components.tokenizer_2("dog", add_special_tokens=False).input_ids[0]
    assert t5.first_id == len(trainer.components.tokenizer_2) - 1 and not torch.equal(t5.new[0], t5.table.weight[dog])
    record = json.loads((tmp_path / "out" / "personalization.json").read_text())
    embeds = load_file(str(tmp_path / "out" / record["artifact"]["tokens"][0]["path"]))
    assert set(embeds) == {"clip_l", "t5"}
    prompt = "a photo of <new1> dog"
    tuned = generate(trainer.components.pipeline(), prompt)
    loaded = load_personalized(tmp_path / "out")
    assert len(loaded.tokenizer_2) == t5.num_embeddings == loaded.text_encoder_2.get_input_embeddings().num_embeddings
    np.testing.assert_allclose(generate(loaded, prompt), tuned, atol=1e-5)


# ------------------------------------------------------------------------------------------- evaluation


def test_evaluator_scores_flux_and_sd3_results_at_their_own_guidance(concept_dir, tmp_path):
    """eval/evaluate.py's engine on FLUX and SD3 results: images, metrics, and the guidance each trained with (FLUX's
    embedded 3.5) unless one is given."""
    from t2i_personal.evaluation import EvalConfig, GenerationOptions, MetricOptions, evaluate

    results = []
    for model in FLOW_MODELS:
        out = tmp_path / model
        run_training(flow_config(concept_dir, out, f"builtin:{model}", method={"name": "dreambooth", "adapter": "lora"}))
        results.append(str(out))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {V} {C} on the beach\n")
    summary = evaluate(EvalConfig(
        models=results, prompts=str(prompts), images_per_prompt=1, seed=0, metrics="clip_t,clip_i", out=str(tmp_path / "eval"),
        generation=GenerationOptions(steps=2, height=32, width=32, device="cpu"),
        metric_options=MetricOptions(clip_model="builtin:toy-clip", batch_size=4), progress=False))
    assert set(summary["models"]) == set(FLOW_MODELS)
    assert all(math.isfinite(summary["models"][m]["overall"]["clip_t"]["mean"]) for m in FLOW_MODELS)
    assert default_guidance(load_personalized(results[0])) == 3.5 and default_guidance(load_personalized(results[1])) == 7.0


def test_flux_dora_reloads_through_diffusers(saved_bases, concept_dir, tmp_path):
    """method.lora.use_dora on FLUX: the diffusers file carries the magnitudes (transformer and CLIP) and reproduces
    the tuned image; no kohya file (diffusers' kohya-FLUX converter, the oracle here, has no DoRA scale)."""
    cfg = flow_config(concept_dir, tmp_path / "out", str(saved_bases / "tiny-flux"),
                      method={"name": "dreambooth", "adapter": "lora", "train_text_encoder": True,
                              "lora": {"rank": 4, "alpha": 8, "use_dora": True}})
    cfg["training"]["learning_rate"] = 5e-2
    tuned = generate(run_training(cfg).components.pipeline())
    lora = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("transformer.") and "lora_magnitude_vector" in k for k in lora)
    assert any(k.startswith("text_encoder.") and "lora_magnitude_vector" in k for k in lora)
    assert not (tmp_path / "out" / "pytorch_lora_weights_kohya.safetensors").exists()
    np.testing.assert_allclose(generate(load_personalized(tmp_path / "out")), tuned, atol=1e-5)
