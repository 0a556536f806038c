"""FLUX.1 transformer -> original BFL single file, checked against diffusers' own converter
(``convert_flux_transformer_checkpoint_to_diffusers``, via ``FluxTransformer2DModel.from_single_file``).

The checks that are the same for every transformer family's single file (weights and output bit-identical, a
round trip through ``from_single_file`` with metadata, both kinds of ``config_dir``, unnamed parameters refused,
missing / unreadable files and configs) are the ``assert_*`` / ``*_round_trip`` helpers below, which
``test_sd3_single_file.py`` imports too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
import pytest
from safetensors import safe_open

from t2i_personal.models import flux_single_file
from t2i_personal.models.flux_single_file import (
    flux_transformer_to_original,
    load_flux_transformer_single_file,
    save_flux_transformer_single_file,
)

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
WIDTH = 32  # heads * head dim

# The original keys of one block, as in BFL's flux1-dev.safetensors (each linear has .weight and .bias).
DOUBLE_BLOCK_KEYS = {f"{side}_{name}.{p}" for side in ("img", "txt") for p in ("weight", "bias")
                     for name in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")} | {
                    f"{side}_attn.norm.{qk}_norm.scale" for side in ("img", "txt") for qk in ("query", "key")}
SINGLE_BLOCK_KEYS = {f"{name}.{p}" for name in ("linear1", "linear2", "modulation.lin") for p in ("weight", "bias")} | {
                     "norm.query_norm.scale", "norm.key_norm.scale"}
TOP_LEVEL_KEYS = {f"{name}.{p}" for p in ("weight", "bias") for name in (
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
    "final_layer.linear", "final_layer.adaLN_modulation.1")}
GUIDANCE_KEYS = {f"guidance_in.{layer}.{p}" for layer in ("in_layer", "out_layer") for p in ("weight", "bias")}


def original_keys(double: int, single: int, guidance: bool) -> set[str]:
    return (TOP_LEVEL_KEYS | (GUIDANCE_KEYS if guidance else set())
            | {f"double_blocks.{i}.{k}" for i in range(double) for k in DOUBLE_BLOCK_KEYS}
            | {f"single_blocks.{i}.{k}" for i in range(single) for k in SINGLE_BLOCK_KEYS})


def tiny_flux(guidance: bool, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():  # default init leaves some layers at zero, which would hide swapped halves / parts
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


class _TorchWithScaledSplit:
    """``torch`` for diffusers' converter, except that ``split`` scales FLUX.1's hard-coded ``linear1`` sizes
    (3072, 3072, 3072, 12288) down to the tensor, so the converter itself runs on tiny models."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def split(tensor, sizes, dim=0):
        rows, total = tensor.shape[dim], sum(sizes)
        if total != rows:
            assert all(size * rows % total == 0 for size in sizes), (sizes, rows)
            sizes = [size * rows // total for size in sizes]
        return torch.split(tensor, sizes, dim)


@pytest.fixture
def diffusers_converter_at_any_width(monkeypatch):
    monkeypatch.setattr(single_file_utils, "torch", _TorchWithScaledSplit())


def forward(model: FluxTransformer2DModel, guidance: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    img_tokens, txt_tokens = 16, 6
    inputs = dict(
        hidden_states=torch.randn(2, img_tokens, 16, generator=gen),
        encoder_hidden_states=torch.randn(2, txt_tokens, 32, generator=gen),
        pooled_projections=torch.randn(2, 32, generator=gen),
        timestep=torch.tensor([0.3, 0.8]),
        img_ids=torch.randint(0, 4, (img_tokens, 3), generator=gen).float(),
        txt_ids=torch.zeros(txt_tokens, 3),
        guidance=torch.tensor([3.5, 1.0]) if guidance else None,
    )
    with torch.no_grad():
        return model(**inputs).sample


# ------------------------------------------------------------------ shared with test_sd3_single_file.py


def assert_same_weights_and_output(loaded: torch.nn.Module, model: torch.nn.Module,
                                   forward: Callable[[torch.nn.Module], torch.Tensor]) -> None:
    """The same parameter names, bit-identical values, and a bit-identical ``forward(model)``."""
    expected, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    differing = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not differing, differing
    assert torch.equal(forward(loaded), forward(model))


def from_single_file_round_trip(save: Callable, model: torch.nn.Module, tmp_path: Path,
                                name: str) -> tuple[set[str], torch.nn.Module]:
    """``model`` saved as a diffusers folder and, with metadata, as the single file ``name`` (no temp file is left
    beside it, the metadata reads back as strings), then loaded by diffusers' own ``from_single_file`` with the
    folder's config: (the file's keys, the loaded model)."""
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    path = save(model, tmp_path / "out" / name, metadata={"modelspec.title": "tiny", "steps": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temp file left behind
    with safe_open(str(path), framework="pt") as file:
        keys = set(file.keys())
        assert file.metadata()["modelspec.title"] == "tiny" and file.metadata()["steps"] == "3"
    loaded = type(model).from_single_file(
        str(path), config=str(tmp_path / "pipe"), subfolder="transformer", torch_dtype=torch.float32)
    return keys, loaded


def loader_round_trips(save: Callable, load: Callable, model: torch.nn.Module, tmp_path: Path,
                       name: str) -> list[torch.nn.Module]:
    """``model`` saved as a diffusers folder and as the single file ``name``, loaded back by our ``load`` with the
    pipeline folder (float32) and with the transformer folder itself (no dtype) as ``config_dir``."""
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    path = save(model, tmp_path / name)
    return [load(path, tmp_path / "pipe", torch.float32), load(path, tmp_path / "pipe" / "transformer")]


def assert_unknown_parameter_refused(model: torch.nn.Module, to_original: Callable, save: Callable,
                                    original_slot: Callable, tmp_path: Path) -> None:
    """A parameter the layout has no name for raises, naming it, before anything is written; an unmerged LoRA's
    says to merge it."""
    model.transformer_blocks[0].attn.register_parameter("extra_gate", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.extra_gate"):
        to_original(model)
    with pytest.raises(ValueError, match="extra_gate"):
        save(model, tmp_path / "model.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written

    with pytest.raises(ValueError, match="merge LoRA"):
        original_slot("transformer_blocks.0.attn.to_q.lora_A.default.weight")


def assert_unreadable_inputs_named(load: Callable, path: Path, config_dir: Path, tmp_path: Path) -> None:
    """A missing file, a ``config_dir`` without a config (``tmp_path``) and a git-lfs pointer each raise naming
    the file (and for the config, ``model.config_dir``); ``path`` is a good file, ``config_dir`` a good config."""
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load(tmp_path / "missing.safetensors", config_dir)
    with pytest.raises(OSError, match="config.json.*model.config_dir"):
        load(path, tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(OSError, match="broken.safetensors"):
        load(tmp_path / "broken.safetensors", config_dir)


# ------------------------------------------------------------------ FLUX


def assert_same_model(loaded: FluxTransformer2DModel, model: FluxTransformer2DModel, guidance: bool) -> None:
    assert_same_weights_and_output(loaded, model, lambda m: forward(m, guidance))


def test_keys_and_shapes_are_the_original_layout():
    model = tiny_flux(guidance=True)
    original = flux_transformer_to_original(model)
    assert set(original) == original_keys(2, 2, guidance=True)
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (3 * WIDTH, WIDTH)
    assert original["single_blocks.0.linear1.weight"].shape == (3 * WIDTH + 4 * WIDTH, WIDTH)
    assert original["final_layer.adaLN_modulation.1.weight"].shape == (2 * WIDTH, WIDTH)
    assert original["double_blocks.1.img_attn.norm.query_norm.scale"].shape == (16,)  # per head

    # the fused / swapped tensors, built independently here
    block = model.single_transformer_blocks[1]
    linear1 = torch.cat([block.attn.to_q.bias, block.attn.to_k.bias, block.attn.to_v.bias, block.proj_mlp.bias])
    assert torch.equal(original["single_blocks.1.linear1.bias"], linear1)
    attn = model.transformer_blocks[0].attn
    txt_qkv = torch.cat([attn.add_q_proj.weight, attn.add_k_proj.weight, attn.add_v_proj.weight])
    assert torch.equal(original["double_blocks.0.txt_attn.qkv.weight"], txt_qkv)
    scale, shift = model.norm_out.linear.weight.chunk(2)
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))

    assert set(flux_transformer_to_original(tiny_flux(guidance=False))) == original_keys(2, 2, guidance=False)


@pytest.mark.parametrize("guidance, variant, n_keys", [(True, "flux-dev", 780), (False, "flux-schnell", 776)])
def test_full_size_keys_match_flux1_and_diffusers_converter(guidance, variant, n_keys):
    """FLUX.1-dev / -schnell's real config, on the meta device: the official key count, the width diffusers'
    converter hard-codes (so it runs unpatched) gives back exactly the model's keys and shapes."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=guidance)
    original = flux_transformer_to_original(model)
    assert len(original) == n_keys and set(original) == original_keys(19, 38, guidance)
    assert original["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert infer_diffusers_model_type(original) == variant
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    expected = model.state_dict()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}


@pytest.mark.parametrize("guidance", [True, False], ids=["dev-like", "schnell-like"])
def test_diffusers_from_single_file_round_trip_is_bit_exact(tmp_path, guidance, diffusers_converter_at_any_width):
    model = tiny_flux(guidance)
    keys, loaded = from_single_file_round_trip(save_flux_transformer_single_file, model, tmp_path, "flux.safetensors")
    assert keys == original_keys(2, 2, guidance)
    assert_same_model(loaded, model, guidance)


@pytest.mark.parametrize("through", ["own split", "diffusers converter"])
def test_loader_round_trip(tmp_path, monkeypatch, through, diffusers_converter_at_any_width):
    if through == "diffusers converter":  # the path a 3072-wide FLUX.1 file takes
        monkeypatch.setattr(flux_single_file, "DIFFUSERS_CONVERTER_WIDTH", WIDTH)
    model = tiny_flux(guidance=True, seed=3)
    for loaded in loader_round_trips(save_flux_transformer_single_file, load_flux_transformer_single_file, model,
                                     tmp_path, "flux.safetensors"):
        assert_same_model(loaded, model, True)


def test_dtype_is_applied(tmp_path):
    model = tiny_flux(guidance=False)
    path = save_flux_transformer_single_file(model, tmp_path / "flux.safetensors", dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as file:
        qkv = file.get_tensor("double_blocks.1.img_attn.qkv.weight")
    assert qkv.dtype == torch.bfloat16
    assert torch.equal(qkv, flux_transformer_to_original(model)["double_blocks.1.img_attn.qkv.weight"].bfloat16())


def test_unknown_parameter_is_refused(tmp_path):
    assert_unknown_parameter_refused(tiny_flux(guidance=True), flux_transformer_to_original,
                                     save_flux_transformer_single_file, flux_single_file.original_slot, tmp_path)


def test_loader_errors_name_the_file_and_the_fix(tmp_path):
    dev = tiny_flux(guidance=True)
    FluxTransformer2DModel(**TINY, guidance_embeds=False).save_pretrained(tmp_path / "schnell" / "transformer")
    path = save_flux_transformer_single_file(dev, tmp_path / "dev.safetensors")

    dev_file_with_schnell_config = r"dev\.safetensors.*guidance_embeds=True.*config's model .*=False.*model\.config_dir"
    with pytest.raises(ValueError, match=dev_file_with_schnell_config):
        load_flux_transformer_single_file(path, tmp_path / "schnell")
    assert_unreadable_inputs_named(load_flux_transformer_single_file, path, tmp_path / "schnell", tmp_path)

    wider = dict(TINY, num_attention_heads=4)
    FluxTransformer2DModel(**wider, guidance_embeds=True).save_pretrained(tmp_path / "wide" / "transformer")
    with pytest.raises(ValueError, match=r"file is 32 wide .* model 64 wide"):
        load_flux_transformer_single_file(path, tmp_path / "wide")
