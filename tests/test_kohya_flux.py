"""FLUX.1 LoRA, peft layout -> kohya layout (t2i_personal/models/kohya_flux.py), checked against diffusers' own
kohya reader (``_convert_kohya_flux_lora_to_diffusers``, which ``FluxLoraLoaderMixin.lora_state_dict`` calls for any
state dict with ``.lora_down.weight`` keys). Tiny models from configs, CPU, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import CLIPTextConfig, CLIPTextModel

from t2i_personal.models.kohya_flux import flux_lora_to_kohya

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK

DOUBLE_BLOCK_TARGETS = (  # txt side without add_k_proj: a fused part without LoRA
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
)
TOP_LEVEL_TARGETS = (
    r"x_embedder|context_embedder|time_text_embed\.\w+\.linear_[12]|norm_out\.linear|proj_out"
)


def tiny_flux(**extra) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], **extra,
    )


def tiny_clip() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77,
    ))


def with_lora(model, target_modules):
    """``model`` with a rank-RANK LoRA whose up weights are random too (gaussian init leaves them zero)."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=target_modules)
    model.add_adapter(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return model


def peft_state(**components) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c, model in components.items() for k, v in get_peft_model_state_dict(model).items()}


def lora_deltas(model) -> dict[str, torch.Tensor]:
    """Merged weight delta (up @ down * scale) of every LoRA module, by module name."""
    return {
        name: module.get_delta_weight(next(iter(module.lora_A))).detach()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def assert_same_deltas(loaded: dict, original: dict, fused_without_lora: set[str] = frozenset()):
    assert set(loaded) == set(original) | fused_without_lora
    for name, delta in loaded.items():
        expected = original.get(name, torch.zeros_like(delta))
        assert delta.shape == expected.shape, name
        assert (delta - expected).abs().max() <= 1e-5, name


def test_double_blocks_and_text_encoder_load_back_through_diffusers():
    torch.manual_seed(0)
    transformer = with_lora(tiny_flux(), DOUBLE_BLOCK_TARGETS)
    text_encoder = with_lora(tiny_clip(), ["q_proj", "k_proj", "v_proj", "out_proj"])
    kohya = flux_lora_to_kohya(peft_state(transformer=transformer, text_encoder=text_encoder), ALPHA)
    kohya = load_safetensors(save_safetensors(kohya))  # as a .safetensors file would carry it

    assert all(k.startswith(("lora_unet_double_blocks_", "lora_te1_text_model_encoder_layers_")) for k in kohya)
    assert kohya["lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight"].shape == (3 * RANK, 32)
    assert kohya["lora_unet_double_blocks_1_img_attn_qkv.alpha"].item() == 3 * ALPHA
    assert kohya["lora_unet_double_blocks_0_txt_mod_lin.alpha"].ndim == 0
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in kohya

    # What FluxPipeline.load_lora_weights does with a kohya state dict, into fresh models.
    state = FluxLoraLoaderMixin.lora_state_dict(dict(kohya))
    fresh_transformer, fresh_text_encoder = tiny_flux(), tiny_clip()
    FluxLoraLoaderMixin.load_lora_into_transformer(state, None, fresh_transformer)
    FluxLoraLoaderMixin.load_lora_into_text_encoder(state, None, fresh_text_encoder, prefix="text_encoder")

    no_add_k = {f"transformer_blocks.{i}.attn.add_k_proj" for i in range(2)}
    assert_same_deltas(lora_deltas(fresh_transformer), lora_deltas(transformer), fused_without_lora=no_add_k)
    assert_same_deltas(lora_deltas(fresh_text_encoder), lora_deltas(text_encoder))


def test_top_level_modules_map_through_diffusers_converter():
    torch.manual_seed(1)
    transformer = with_lora(tiny_flux(guidance_embeds=True), TOP_LEVEL_TARGETS)
    original = lora_deltas(transformer)
    assert len(original) == 10
    kohya = flux_lora_to_kohya(peft_state(transformer=transformer), ALPHA)
    assert {k.rsplit(".", 2)[0] for k in kohya if k.endswith("lora_down.weight")} == {
        "lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer",
        "lora_unet_vector_in_in_layer", "lora_unet_vector_in_out_layer", "lora_unet_guidance_in_in_layer",
        "lora_unet_guidance_in_out_layer", "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear",
    }

    # diffusers 0.42.1 names these without the "transformer." prefix (so its loader skips them); the scale is folded.
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for name, delta in original.items():
        prefix = "transformer." if f"transformer.{name}.lora_A.weight" in converted else ""
        up, down = converted[f"{prefix}{name}.lora_B.weight"], converted[f"{prefix}{name}.lora_A.weight"]
        assert (up @ down - delta).abs().max() <= 1e-5, name


@pytest.mark.parametrize("parts", [("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("attn.to_q", "attn.to_v")])
def test_single_block_fusion_is_exact(parts):
    torch.manual_seed(2)
    targets = [f"single_transformer_blocks.0.{m}" for m in (*parts, "proj_out", "norm.linear")]
    transformer = with_lora(tiny_flux(), targets)
    original = lora_deltas(transformer)
    kohya = flux_lora_to_kohya(peft_state(transformer=transformer), ALPHA)
    dim = 32

    down = kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    alpha = kohya["lora_unet_single_blocks_0_linear1.alpha"].item()
    assert down.shape == (4 * RANK, dim) and up.shape == (3 * dim + 4 * dim, 4 * RANK)
    assert alpha / down.shape[0] == SCALE

    widths = [dim, dim, dim, 4 * dim]
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    expected = torch.cat([
        original.get(f"single_transformer_blocks.0.{n}", torch.zeros(w, dim)) for n, w in zip(names, widths)
    ])
    assert (up @ down * alpha / down.shape[0] - expected).abs().max() <= 1e-5

    # Block diagonal (what diffusers' converter detects as "sparse"); a part without LoRA is exactly zero.
    row = 0
    for part, (name, width) in enumerate(zip(names, widths)):
        block_rows, rank_cols = slice(row, row + width), slice(part * RANK, (part + 1) * RANK)
        off_diagonal = up[block_rows].clone()
        off_diagonal[:, rank_cols] = 0
        assert not off_diagonal.any()
        if name not in parts:
            assert not down[rank_cols].any() and not up[block_rows].any()
        row += width

    for kohya_name, module in [("linear2", "proj_out"), ("modulation_lin", "norm.linear")]:
        down = kohya[f"lora_unet_single_blocks_0_{kohya_name}.lora_down.weight"]
        up = kohya[f"lora_unet_single_blocks_0_{kohya_name}.lora_up.weight"]
        assert kohya[f"lora_unet_single_blocks_0_{kohya_name}.alpha"].item() == ALPHA
        assert (up @ down * SCALE - original[f"single_transformer_blocks.0.{module}"]).abs().max() <= 1e-5


def test_single_block_at_flux1_widths_round_trips_through_diffusers():
    """diffusers' converter hard-codes FLUX.1's linear1 widths, so feed it a synthetic LoRA at those widths."""
    torch.manual_seed(3)
    dim, rank = 3072, 2
    outputs = {"attn.to_q": dim, "attn.to_k": dim, "attn.to_v": dim, "proj_mlp": 4 * dim}
    state = {}
    for module, width in outputs.items():
        state[f"transformer.single_transformer_blocks.5.{module}.lora_A.weight"] = torch.randn(rank, dim)
        state[f"transformer.single_transformer_blocks.5.{module}.lora_B.weight"] = torch.randn(width, rank)
    del state["transformer.single_transformer_blocks.5.attn.to_k.lora_A.weight"]
    del state["transformer.single_transformer_blocks.5.attn.to_k.lora_B.weight"]

    converted = _convert_kohya_flux_lora_to_diffusers(flux_lora_to_kohya(state, 3.0))
    probe = torch.randn(dim, 8)
    for module, width in outputs.items():
        name = f"transformer.single_transformer_blocks.5.{module}"
        up, down = converted[f"{name}.lora_B.weight"], converted[f"{name}.lora_A.weight"]
        assert down.shape == (rank, dim), name  # split back: the "sparse" branch, not rank 4*rank copies
        if f"{name}.lora_A.weight" in state:
            expected = state[f"{name}.lora_B.weight"] @ (state[f"{name}.lora_A.weight"] @ probe) * 3.0 / rank
        else:
            expected = torch.zeros(width, 8)
        assert (up @ (down @ probe) - expected).abs().max() <= 1e-3 * expected.abs().max().clamp(min=1), name


A, B = torch.zeros(4, 32), torch.zeros(32, 4)


@pytest.mark.parametrize(
    ("state", "named"),
    [
        ({"transformer.transformer_blocks.0.attn.to_q.weight": B}, "transformer.transformer_blocks.0.attn.to_q.weight"),
        ({"transformer.pos_embed.lora_A.weight": A, "transformer.pos_embed.lora_B.weight": B}, "pos_embed"),
        ({"transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": A,
          "transformer.transformer_blocks.0.attn.norm_q.lora_B.weight": B}, "transformer_blocks.0.attn.norm_q"),
        ({"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": A,
          "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": B}, "text_encoder_2"),
        ({"text_encoder.text_model.embeddings.token_embedding.lora_A.weight": A,
          "text_encoder.text_model.embeddings.token_embedding.lora_B.weight": B}, "token_embedding"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": A}, "lora_B"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": A[0]}, "lora_magnitude_vector"),
    ],
)
def test_bad_input_raises_naming_it(state, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        flux_lora_to_kohya(state, ALPHA)
