"""Custom Diffusion (``method.name: custom_diffusion``): only the cross-attention K/V (optionally Q/out) projections
and the modifier token train, the BOS token's K/V get no gradient, and the exported file loads with the plain
diffusers recipe and reproduces ``load_personalized``; a load that did not apply the weights is an error."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config, run_training
from t2i_personal import load_personalized
from t2i_personal.config import load_config
from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.methods.custom_diffusion import (WEIGHTS, apply_weights, check_applied, install_processors,
                                                   processor_state_dict)
from t2i_personal.methods.tokens import LearnedTokens
from t2i_personal.models.loading import load_components

TOKEN = "<new1>"
PROMPT = f"a photo of {TOKEN} dog"
EMBEDS = "learned_embeds-0-new1.safetensors"
KV = {"to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight"}
Q_OUT = {"to_q_custom_diffusion.weight", "to_out_custom_diffusion.0.weight", "to_out_custom_diffusion.0.bias"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cd_config(concept_dir, out, params=None) -> dict:
    method = {"name": "custom_diffusion", **({"custom_diffusion_params": params} if params else {})}
    return base_config(concept_dir, out, method=method,
                       concepts=[{"identifier": TOKEN, "initializer_token": "dog", "class_noun": "dog",
                                  "instance_dir": str(concept_dir)}],
                       training={"learning_rate": 1e-2, "token_learning_rate": 0.5})


def generate(pipe, prompt=PROMPT) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images


_RUNS = {}


@pytest.fixture(scope="module")
def cd_run(concept_dir, tmp_path_factory):
    def get(params: str):
        if params not in _RUNS:
            out = tmp_path_factory.mktemp(f"cd-{params}") / "out"
            _RUNS[params] = (run_training(cd_config(concept_dir, out, params)), out)
        return _RUNS[params]

    yield get
    _RUNS.clear()


def cross_attention_names(unet) -> list[str]:
    return [n for n, _ in unet.named_modules() if n.endswith("attn2")]


@pytest.mark.parametrize("params", ["crossattn_kv", "crossattn"])
def test_only_cross_attention_projections_and_the_token_train(params, cd_run):
    trainer, out = cd_run(params)
    base, tuned = load_components("builtin:tiny-sd"), trainer.components
    wanted = KV | (Q_OUT if params == "crossattn" else set())

    old, new = base.unet.state_dict(), tuned.unet.state_dict()
    assert set(old) <= set(new)
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert not changed, f"the UNet's own weights must stay bitwise unchanged: {changed[:3]}"
    added = set(new) - set(old)
    layers = cross_attention_names(base.unet)
    assert layers and added == {f"{layer}.processor.{key}" for layer in layers for key in wanted}
    for key in sorted(added):
        layer, sub = key.split(".processor.")
        source = {"to_k_custom_diffusion.weight": "to_k.weight", "to_v_custom_diffusion.weight": "to_v.weight",
                  "to_q_custom_diffusion.weight": "to_q.weight", "to_out_custom_diffusion.0.weight": "to_out.0.weight",
                  "to_out_custom_diffusion.0.bias": "to_out.0.bias"}[sub]
        assert not torch.equal(new[key], old[f"{layer}.{source}"]), f"{key} did not train"
    self_attention = [p for n, p in tuned.unet.attn_processors.items() if ".attn1." in n]
    assert self_attention and not any(isinstance(p, torch.nn.Module) for p in self_attention)

    # Text encoder: the new row trained, every other weight (all 49408 old rows included) is the base model's.
    emb = tuned.text_encoder.get_input_embeddings()
    assert torch.equal(emb.table.weight, base.text_encoder.get_input_embeddings().weight)
    assert not torch.equal(emb.new[0].detach(), base.text_encoder.get_input_embeddings().weight[1929])  # 'dog'
    te_old = base.text_encoder.state_dict()
    te_new = {k.replace("token_embedding.table.", "token_embedding."): v for k, v in tuned.text_encoder.state_dict().items()
              if not k.endswith("token_embedding.new")}
    assert te_old.keys() == te_new.keys() and all(torch.equal(te_old[k], te_new[k]) for k in te_old)
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in tuned.vae.state_dict().items())

    # What the optimizer updates is exactly the processors' tensors plus the token row.
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    processors = {id(p) for layer in layers for p in tuned.unet.get_submodule(layer).processor.parameters()}
    rows = {id(p) for p in LearnedTokens(trainer.config.concepts).parameters(tuned)}
    assert trained == processors | rows and len(processors) == len(layers) * len(wanted)

    record = json.loads((out / "personalization.json").read_text())
    assert record["method"] == "custom_diffusion"
    assert record["artifact"]["type"] == "custom_diffusion" and record["artifact"]["params"] == params
    assert record["artifact"]["tokens"] == [{"token": TOKEN, "path": EMBEDS}]
    assert set(load_file(str(out / WEIGHTS))) == added
    assert not list(out.glob("*/diffusion_pytorch_model.safetensors")), "no full UNet is exported"


def test_bos_token_keys_and_values_get_no_gradient():
    reference = load_components("builtin:tiny-sd").unet
    unet = load_components("builtin:tiny-sd").unet
    install_processors(unet, train_q_out=False)
    layer = cross_attention_names(unet)[0]
    ref_attn, attn = reference.get_submodule(layer), unet.get_submodule(layer)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    context = torch.randn(2, 5, attn.to_k.in_features)

    def grad_of_context(module):
        ctx = context.clone().requires_grad_(True)
        out = module(hidden, encoder_hidden_states=ctx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), ctx.grad

    ref_out, ref_grad = grad_of_context(ref_attn)
    out, grad = grad_of_context(attn)
    # Initialised from the layer's own K/V, the processor computes the same attention ...
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    # ... but the BOS position (0) reaches the loss only through K/V, which are detached there: its gradient is 0,
    # whereas the stock processor does pass a gradient to it.
    assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))
    assert ref_grad[:, 0].abs().max() > 0
    assert (grad[:, 1:].abs().amax(dim=-1) > 0).all()
    torch.testing.assert_close(grad[:, 1:], ref_grad[:, 1:], rtol=1e-4, atol=1e-6)
    # the trained projections still get their gradient (from the other tokens)
    assert attn.processor.to_k_custom_diffusion.weight.grad.abs().sum() > 0
    assert attn.processor.to_v_custom_diffusion.weight.grad.abs().sum() > 0


def plain_diffusers_recipe(out):
    """The documented plain-diffusers way to use the exported files (no t2i_personal code involved)."""
    pipe = load_components("builtin:tiny-sd").pipeline()
    state = load_file(str(out / WEIGHTS))
    for name in pipe.unet.attn_processors:
        if not any(k.startswith(name + ".") for k in state):
            state[name] = {}  # the self-attention layers: diffusers expects an empty entry for each
    pipe.unet.load_attn_procs(state, _pipeline=pipe)
    pipe.load_textual_inversion(str(out / EMBEDS), token=TOKEN)
    return pipe


@pytest.mark.parametrize("params", ["crossattn_kv", "crossattn"])
def test_export_loads_with_the_plain_diffusers_recipe(params, cd_run):
    trainer, out = cd_run(params)
    live = generate(trainer.components.pipeline())
    personalized = generate(load_personalized(out))
    np.testing.assert_array_equal(personalized, live)

    plain = plain_diffusers_recipe(out)
    check_applied(plain.unet, load_file(str(out / WEIGHTS)))  # diffusers' own processors hold the same tensors
    # diffusers' loader installs the non-SDPA CustomDiffusionAttnProcessor (also on self-attention): same math,
    # other kernels
    np.testing.assert_allclose(generate(plain), personalized, atol=1e-5)
    assert np.abs(generate(load_components("builtin:tiny-sd").pipeline(), "a photo of dog dog") - personalized).max() > 1e-3


def test_apply_weights_installs_and_verifies(cd_run):
    _, out = cd_run("crossattn_kv")
    state = load_file(str(out / WEIGHTS))
    unet = load_components("builtin:tiny-sd").unet
    apply_weights(unet, state)
    live = processor_state_dict(unet)
    assert live.keys() == state.keys() and all(torch.equal(live[k], state[k]) for k in state)
    check_applied(unet, state)

    # processors present but holding other tensors (e.g. freshly initialised ones): not applied
    fresh = load_components("builtin:tiny-sd").unet
    install_processors(fresh, train_q_out=False)
    with pytest.raises(ModelLoadError, match="not applied"):
        check_applied(fresh, state)

    # a file missing a layer, or naming layers of another model, is refused
    layer = cross_attention_names(unet)[0]
    partial = {k: v for k, v in state.items() if not k.startswith(layer + ".")}
    with pytest.raises(ModelLoadError, match="no entry for"):
        apply_weights(load_components("builtin:tiny-sd").unet, partial)
    foreign = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in state.items()}
    with pytest.raises(ModelLoadError, match="another base model"):
        apply_weights(load_components("builtin:tiny-sd").unet, foreign)


def test_check_applied_detects_the_silent_diffusers_no_op(cd_run):
    _, out = cd_run("crossattn_kv")
    pipe = load_components("builtin:tiny-sd").pipeline()
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    pipe.unet.load_attn_procs(str(out), weight_name=WEIGHTS)  # no _pipeline=: diffusers returns without doing anything
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    with pytest.raises(ModelLoadError, match="not applied"):
        check_applied(pipe.unet, load_file(str(out / WEIGHTS)))


def test_sdxl_custom_diffusion_reloads_exactly(concept_dir, tmp_path):
    out = tmp_path / "out"
    cfg = cd_config(concept_dir, out)
    cfg["model"]["pretrained"] = "builtin:tiny-sdxl"
    trainer = run_training(cfg)
    assert set(load_file(str(out / EMBEDS))) == {"clip_l", "clip_g"}
    layers = cross_attention_names(trainer.components.unet)
    assert set(load_file(str(out / WEIGHTS))) == {f"{layer}.processor.{key}" for layer in layers for key in KV}
    np.testing.assert_array_equal(generate(load_personalized(out)), generate(trainer.components.pipeline()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_custom_diffusion_loads_in_half_precision(dtype, cd_run):
    _, out = cd_run("crossattn_kv")
    pipe = load_personalized(out, dtype=dtype)
    state = load_file(str(out / WEIGHTS))
    live = processor_state_dict(pipe.unet)
    assert live.keys() == state.keys()
    assert all(live[k].dtype == dtype and torch.equal(live[k], state[k].to(dtype)) for k in state)


@pytest.mark.parametrize("method,message", [
    ({"adapter": "lora"}, "method.adapter"),
    ({"train_text_encoder": True}, "method.train_text_encoder"),
    ({"prior": "base_prediction"}, "base_prediction"),
])
def test_config_rejects_what_custom_diffusion_does_not_do(method, message, concept_dir, tmp_path):
    cfg = cd_config(concept_dir, tmp_path / "out")
    cfg["method"].update(method)
    with pytest.raises(ConfigError, match=message):
        load_config(base=cfg)


def test_custom_diffusion_params_needs_custom_diffusion(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "custom_diffusion_params": "crossattn"})
    with pytest.raises(ConfigError, match="custom_diffusion_params"):
        load_config(base=cfg)
    cfg = load_config(base=cd_config(concept_dir, tmp_path / "out", "crossattn"))
    assert cfg.method.custom_diffusion_params == "crossattn"
