"""SD3 / SD3.5 transformer -> original Stability single file, checked against diffusers' own converter
(``convert_sd3_transformer_checkpoint_to_diffusers``, via ``SD3Transformer2DModel.from_single_file``)."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import save_file

from test_flux_single_file import (assert_same_weights_and_output, assert_unknown_parameter_refused,
                                   assert_unreadable_inputs_named, from_single_file_round_trip, loader_round_trips)
from t2i_personal.models import sd3_single_file
from t2i_personal.models.sd3_single_file import (
    load_sd3_transformer_single_file,
    save_sd3_transformer_single_file,
    sd3_transformer_to_original,
)

PREFIX = "model.diffusion_model."
TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
            pos_embed_max_size=16)
SD35 = dict(qk_norm="rms_norm", dual_attention_layers=(0,))  # SD3.5-Medium-like: qk norms, attn2 in block 0
WIDTH = 32  # heads * head dim
VARIANTS = {"sd3": {}, "sd35": SD35}

# Stability's released configs (the diffusers repos' transformer/config.json), built on the meta device below.
FULL_SIZE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                 joint_attention_dim=4096, pooled_projection_dim=2048)
SD3_MEDIUM = dict(FULL_SIZE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                  pos_embed_max_size=192)
SD35_MEDIUM = dict(FULL_SIZE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
SD35_LARGE = dict(FULL_SIZE, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, qk_norm="rms_norm")

LINEARS = ("adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def original_keys(layers: int, qk_norm: bool = False, dual: tuple[int, ...] = ()) -> set[str]:
    """The original keys (no prefix) of an SD3 MMDiT, written out independently of the module's tables."""
    keys = {"pos_embed"} | {f"{name}.{p}" for p in ("weight", "bias") for name in (
        "x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
        "context_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1")}
    norms = {"attn.ln_q.weight", "attn.ln_k.weight"} if qk_norm else set()
    for i in range(layers):
        context = LINEARS if i < layers - 1 else LINEARS[:2]  # the last context block is pre_only
        x_block = {f"{name}.{p}" for name in LINEARS for p in ("weight", "bias")} | norms
        if i in dual:
            x_block |= {f"attn2.{name}.{p}" for name in ("qkv", "proj") for p in ("weight", "bias")}
            x_block |= {n.replace("attn.", "attn2.") for n in norms}
        keys |= {f"joint_blocks.{i}.x_block.{k}" for k in x_block}
        keys |= {f"joint_blocks.{i}.context_block.{k}" for k in
                 {f"{name}.{p}" for name in context for p in ("weight", "bias")} | norms}
    return keys


def tiny_sd3(variant: str = "sd3", seed: int = 0, **overrides) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**TINY, **VARIANTS[variant], **overrides}).eval()
    with torch.no_grad():  # default init leaves some layers at zero / one, which would hide swapped halves / parts
        for param in model.parameters():
            param.normal_(0, 0.2)
        model.pos_embed.pos_embed.add_(torch.randn_like(model.pos_embed.pos_embed))  # must come from the file too
    return model


def forward(model: SD3Transformer2DModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(2, 6, 64, generator=gen),
        pooled_projections=torch.randn(2, 64, generator=gen),
        timestep=torch.tensor([300.0, 800.0]),
    )
    with torch.no_grad():
        return model(**inputs).sample


def assert_same_model(loaded: SD3Transformer2DModel, model: SD3Transformer2DModel) -> None:
    def architecture(config):  # json round trips make tuples lists
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}
    assert architecture(loaded.config) == architecture(model.config)
    assert_same_weights_and_output(loaded, model, forward)


def test_keys_and_shapes_are_the_original_layout():
    model = tiny_sd3("sd3")
    original = sd3_transformer_to_original(model)
    assert set(original) == original_keys(2)
    assert original["joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * WIDTH, WIDTH)
    assert original["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (6 * WIDTH, WIDTH)
    assert original["joint_blocks.1.context_block.adaLN_modulation.1.weight"].shape == (2 * WIDTH, WIDTH)
    assert original["final_layer.adaLN_modulation.1.weight"].shape == (2 * WIDTH, WIDTH)
    assert original["pos_embed"].shape == (1, 16 * 16, WIDTH)
    assert original["x_embedder.proj.weight"].shape == (WIDTH, 4, 2, 2)

    # the fused / swapped tensors, built independently here
    attn = model.transformer_blocks[1].attn
    context_qkv = torch.cat([attn.add_q_proj.bias, attn.add_k_proj.bias, attn.add_v_proj.bias])
    assert torch.equal(original["joint_blocks.1.context_block.attn.qkv.bias"], context_qkv)
    x_qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    assert torch.equal(original["joint_blocks.1.x_block.attn.qkv.weight"], x_qkv)
    scale, shift = model.norm_out.linear.weight.chunk(2)
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    scale, shift = model.transformer_blocks[1].norm1_context.linear.bias.chunk(2)  # last block: pre_only, swapped
    assert torch.equal(original["joint_blocks.1.context_block.adaLN_modulation.1.bias"], torch.cat([shift, scale]))
    # ... but not the full (6-way) context modulation of the other blocks, nor the x side
    assert torch.equal(original["joint_blocks.0.context_block.adaLN_modulation.1.bias"],
                       model.transformer_blocks[0].norm1_context.linear.bias)
    assert torch.equal(original["joint_blocks.1.x_block.adaLN_modulation.1.weight"],
                       model.transformer_blocks[1].norm1.linear.weight)
    assert torch.equal(original["pos_embed"], model.pos_embed.pos_embed)


def test_sd35_keys_qk_norms_and_dual_attention():
    model = tiny_sd3("sd35")
    original = sd3_transformer_to_original(model)
    assert set(original) == original_keys(2, qk_norm=True, dual=(0,))
    block = model.transformer_blocks[0]
    assert original["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * WIDTH, WIDTH)  # AdaLN-Zero X
    attn2_qkv = torch.cat([block.attn2.to_q.weight, block.attn2.to_k.weight, block.attn2.to_v.weight])
    assert torch.equal(original["joint_blocks.0.x_block.attn2.qkv.weight"], attn2_qkv)
    assert torch.equal(original["joint_blocks.0.x_block.attn2.proj.bias"], block.attn2.to_out[0].bias)
    assert torch.equal(original["joint_blocks.0.x_block.attn2.ln_k.weight"], block.attn2.norm_k.weight)
    assert torch.equal(original["joint_blocks.1.context_block.attn.ln_q.weight"],
                       model.transformer_blocks[1].attn.norm_added_q.weight)
    assert original["joint_blocks.1.x_block.attn.ln_q.weight"].shape == (8,)  # per head


@pytest.mark.parametrize("config, variant, layers, qk_norm, dual", [
    (SD3_MEDIUM, "sd3", 24, False, ()),
    (SD35_MEDIUM, "sd35_medium", 24, True, tuple(range(13))),
    (SD35_LARGE, "sd35_large", 38, True, ()),
], ids=["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_full_size_keys_match_diffusers_detection_and_converter(config, variant, layers, qk_norm, dual):
    """Stability's real configs on the meta device: the file's prefixed keys are detected as the right variant by
    diffusers, and diffusers' converter gives back exactly the model's keys and shapes."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    original = sd3_transformer_to_original(model)
    assert set(original) == original_keys(layers, qk_norm, dual)
    prefixed = {PREFIX + key: tensor for key, tensor in original.items()}  # what the saved file holds
    assert infer_diffusers_model_type(prefixed) == variant
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(prefixed))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_from_single_file_round_trip_is_bit_exact(tmp_path, variant):
    model = tiny_sd3(variant)
    keys, loaded = from_single_file_round_trip(save_sd3_transformer_single_file, model, tmp_path, "sd3.safetensors")
    expected = original_keys(2, qk_norm=variant == "sd35", dual=(0,) if variant == "sd35" else ())
    assert keys == {PREFIX + key for key in expected}
    assert_same_model(loaded, model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loader_round_trip(tmp_path, variant):
    model = tiny_sd3(variant, seed=3)
    for loaded in loader_round_trips(save_sd3_transformer_single_file, load_sd3_transformer_single_file, model,
                                     tmp_path, "sd3.safetensors"):
        assert_same_model(loaded, model)


def test_loader_reads_full_checkpoints_and_unprefixed_files(tmp_path):
    model = tiny_sd3("sd35", seed=5)
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    original = {key: t.contiguous() for key, t in sd3_transformer_to_original(model).items()}
    others = {  # what Stability's full files hold next to the transformer
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
    }
    save_file({**{PREFIX + k: t for k, t in original.items()}, **others}, str(tmp_path / "full.safetensors"))
    assert_same_model(load_sd3_transformer_single_file(tmp_path / "full.safetensors", tmp_path / "pipe"), model)
    save_file(original, str(tmp_path / "bare.safetensors"))
    assert_same_model(load_sd3_transformer_single_file(tmp_path / "bare.safetensors", tmp_path / "pipe"), model)


def test_dtype_is_applied(tmp_path):
    model = tiny_sd3("sd3")
    path = save_sd3_transformer_single_file(model, tmp_path / "sd3.safetensors", dtype=torch.float16)
    key = "joint_blocks.1.context_block.adaLN_modulation.1.weight"
    with safe_open(str(path), framework="pt") as file:
        tensor = file.get_tensor(PREFIX + key)
    assert tensor.dtype == torch.float16
    assert torch.equal(tensor, sd3_transformer_to_original(model)[key].half())
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = load_sd3_transformer_single_file(path, tmp_path / "pipe", dtype=torch.float16)
    assert loaded.dtype == torch.float16
    assert torch.equal(loaded.norm_out.linear.weight, model.norm_out.linear.weight.half())


def test_unknown_parameter_is_refused(tmp_path):
    assert_unknown_parameter_refused(tiny_sd3("sd3"), sd3_transformer_to_original, save_sd3_transformer_single_file,
                                     sd3_single_file.original_slot, tmp_path)
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.norm_q\.bias"):  # a layer_norm qk norm
        sd3_transformer_to_original(tiny_sd3("sd3", qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        sd3_transformer_to_original(tiny_sd3("sd3", pos_embed_max_size=None))


def test_loader_errors_name_the_file_and_the_fix(tmp_path):
    sd35 = tiny_sd3("sd35")
    SD3Transformer2DModel(**TINY).save_pretrained(tmp_path / "sd3" / "transformer")
    path = save_sd3_transformer_single_file(sd35, tmp_path / "sd35.safetensors")

    sd35_file_with_sd3_config = (r"sd35\.safetensors.*file is 32 wide with 2 joint blocks, with qk norm.*"
                                 r"dual attention in blocks \[0\].*config's model .*without qk norm.*"
                                 r"model\.config_dir")
    with pytest.raises(ValueError, match=sd35_file_with_sd3_config):
        load_sd3_transformer_single_file(path, tmp_path / "sd3")
    assert_unreadable_inputs_named(load_sd3_transformer_single_file, path, tmp_path / "sd3", tmp_path)
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(ValueError, match=r"vae\.safetensors is not an original-layout SD3"):
        load_sd3_transformer_single_file(tmp_path / "vae.safetensors", tmp_path / "sd3")

    wider = dict(TINY, num_attention_heads=8, caption_projection_dim=64)
    SD3Transformer2DModel(**wider).save_pretrained(tmp_path / "wide" / "transformer")
    sd3_path = save_sd3_transformer_single_file(tiny_sd3("sd3"), tmp_path / "sd3.safetensors")
    with pytest.raises(ValueError, match=r"file is 32 wide .* model is 64 wide.*model\.config_dir"):
        load_sd3_transformer_single_file(sd3_path, tmp_path / "wide")
    bigger_grid = dict(TINY, pos_embed_max_size=24)
    SD3Transformer2DModel(**bigger_grid).save_pretrained(tmp_path / "grid" / "transformer")
    with pytest.raises(ValueError, match=r"pos_embed 16x16.*pos_embed 24x24"):
        load_sd3_transformer_single_file(sd3_path, tmp_path / "grid")
