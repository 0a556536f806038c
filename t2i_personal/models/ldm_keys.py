"""diffusers -> original (CompVis "LDM") parameter names for the UNet and the VAE.

The tables are derived from each model's module structure, so tiny test models map as well as SD 1.5 / 2.1 /
SDXL; anything the LDM layout has no place for raises instead of being dropped. :mod:`.single_file` adds the
text encoders and writes the file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_Table = dict[str, tuple[str, tuple[tuple[str, str], ...]]]

# Sub-module renames inside one block: diffusers name -> LDM name (first match on the remainder wins).
_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_RESNET_RENAMES = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("conv_shortcut.", "nin_shortcut."),
)
_VAE_ATTN_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_KEEP = (("", ""),)  # remainder unchanged (attention transformers, convs, linears)

_UNET_DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UNET_UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}


# --------------------------------------------------------------------------------------------- helpers


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip ``torch.compile`` / (Distributed)DataParallel wrappers so state-dict keys are the plain ones."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            module = inner
        elif type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            module = module.module
        else:
            return module


def _apply_table(
    state_dict: Mapping[str, torch.Tensor],
    table: Mapping[str, tuple[str, tuple[tuple[str, str], ...]]],
    what: str,
) -> dict[str, torch.Tensor]:
    """Map every key through ``table``: diffusers module prefix -> (LDM prefix, remainder renames).

    The longest matching prefix wins. Keys no entry covers raise, so nothing is silently dropped.
    """
    prefixes = sorted(table, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix + "."):
                new_prefix, renames = table[prefix]
                rest = key[len(prefix) + 1 :]
                for old, new in renames:
                    if rest.startswith(old):
                        new_key = f"{new_prefix}.{new}{rest[len(old):]}"
                        break
                else:
                    unmapped.append(key)
                    break
                if new_key in out:
                    raise RuntimeError(f"{what}: two parameters map to {new_key!r}")
                out[new_key] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:8]) + (f" ... (+{len(unmapped) - 8})" if len(unmapped) > 8 else "")
        raise NotImplementedError(f"{what}: no original-layout name for {len(unmapped)} parameter(s): {shown}")
    return out


def check_supported(cond: bool, message: str) -> None:
    if not cond:
        raise NotImplementedError(message)


# ------------------------------------------------------------------------------------------------ UNet


def convert_unet(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    unet = unwrap(unet)
    check_supported(type(unet).__name__ == "UNet2DConditionModel", f"UNet: {type(unet).__name__} is not supported")
    converted = _apply_table(unet.state_dict(), _unet_table(unet), "UNet")
    return {UNET_PREFIX + k: v for k, v in converted.items()}


def _unet_table(unet: torch.nn.Module) -> _Table:
    lpb = unet.config.layers_per_block
    check_supported(
        isinstance(lpb, int),
        f"UNet: layers_per_block={lpb!r} per block; the original layout (and diffusers' loader) need one integer",
    )
    table: _Table = {
        "conv_in": ("input_blocks.0.0", _KEEP),
        "time_embedding.linear_1": ("time_embed.0", _KEEP),
        "time_embedding.linear_2": ("time_embed.2", _KEEP),
        "conv_norm_out": ("out.0", _KEEP),
        "conv_out": ("out.2", _KEEP),
    }
    table.update(_label_embedding_entries(unet))
    table.update(_down_block_entries(unet.down_blocks, lpb))
    table.update(_mid_block_entries(unet.mid_block))
    table.update(_up_block_entries(unet.up_blocks, lpb))
    return table


def _label_embedding_entries(unet: torch.nn.Module) -> _Table:
    """``class_embedding`` (x4 upscaler, timestep/projection classes) or SDXL's ``add_embedding`` -> ``label_emb``."""
    config = unet.config
    table: _Table = {}
    class_embedding = getattr(unet, "class_embedding", None)
    if isinstance(class_embedding, torch.nn.Embedding):  # num_class_embeds (x4 upscaler)
        table["class_embedding"] = ("label_emb", _KEEP)
    elif class_embedding is not None:
        check_supported(
            config.class_embed_type in ("timestep", "projection"),
            f"UNet: class_embed_type={config.class_embed_type!r} has no original-layout equivalent",
        )
        table["class_embedding.linear_1"] = ("label_emb.0.0", _KEEP)
        table["class_embedding.linear_2"] = ("label_emb.0.2", _KEEP)
    if getattr(unet, "add_embedding", None) is not None:
        check_supported(
            config.addition_embed_type == "text_time",
            f"UNet: addition_embed_type={config.addition_embed_type!r} is not supported (only SDXL's 'text_time')",
        )
        check_supported(class_embedding is None, "UNet: class_embedding and add_embedding would both need label_emb")
        table["add_embedding.linear_1"] = ("label_emb.0.0", _KEEP)
        table["add_embedding.linear_2"] = ("label_emb.0.2", _KEEP)
    return table


def _down_block_entries(down_blocks, lpb: int) -> _Table:
    """input_blocks: 0 is conv_in; then per down block ``lpb`` x (resnet[, attention]) and, except after the
    last block, one downsampler (``input_blocks.N.0.op``)."""
    table: _Table = {}
    index = 1
    for b, block in enumerate(down_blocks):
        index = _resnet_attention_pairs(table, block, "down", b, lpb, _UNET_DOWN_TYPES, "input_blocks", index)
        has_down = block.downsamplers is not None
        check_supported(has_down == (b < len(down_blocks) - 1),
                        f"UNet: down_blocks.{b} downsampler placement is not the SD one")
        if has_down:
            check_supported(len(block.downsamplers) == 1, f"UNet: down_blocks.{b} has several downsamplers")
            table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", _KEEP)
            index += 1
    return table


def _resnet_attention_pairs(table: _Table, block, kind: str, b: int, n: int, types, out: str, index: int) -> int:
    """Check that ``{kind}_blocks.{b}`` holds ``n`` resnets (and as many attentions, if any) and map pair ``j`` to
    ``{out}.{index + j}.0`` / ``.1``; return the next output index."""
    name, where = type(block).__name__, f"{kind}_blocks.{b}"
    check_supported(name in types, f"UNet: {kind} block type {name} is not supported")
    check_supported(len(block.resnets) == n, f"UNet: {where} has {len(block.resnets)} resnets, expected {n}")
    attentions = getattr(block, "attentions", None)
    check_supported(attentions is None or len(attentions) == n,
                    f"UNet: {where} has {len(attentions or [])} attentions for {n} resnets")
    for j in range(n):
        table[f"{where}.resnets.{j}"] = (f"{out}.{index}.0", _UNET_RESNET_RENAMES)
        if attentions is not None:
            table[f"{where}.attentions.{j}"] = (f"{out}.{index}.1", _KEEP)
        index += 1
    return index


def _mid_block_entries(mid) -> _Table:
    check_supported(
        mid is not None and type(mid).__name__ == "UNetMidBlock2DCrossAttn",
        f"UNet: mid block {type(mid).__name__} is not supported (the original layout is resnet, attention, resnet)",
    )
    check_supported(len(mid.resnets) == 2 and len(mid.attentions) == 1,
                    "UNet: mid block must have 2 resnets, 1 attention")
    return {
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET_RENAMES),
        "mid_block.attentions.0": ("middle_block.1", _KEEP),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET_RENAMES),
    }


def _up_block_entries(up_blocks, lpb: int) -> _Table:
    """output_blocks: per up block ``lpb + 1`` x (resnet[, attention]); the upsampler sits in the last one, after
    the attention if there is one (``output_blocks.N.2.conv``) or right after the resnet (``.1.conv``)."""
    table: _Table = {}
    index = 0
    n = lpb + 1
    for b, block in enumerate(up_blocks):
        index = _resnet_attention_pairs(table, block, "up", b, n, _UNET_UP_TYPES, "output_blocks", index)
        attentions = getattr(block, "attentions", None)
        has_up = block.upsamplers is not None
        check_supported(has_up == (b < len(up_blocks) - 1),
                        f"UNet: up_blocks.{b} upsampler placement is not the SD one")
        if has_up:
            check_supported(len(block.upsamplers) == 1, f"UNet: up_blocks.{b} has several upsamplers")
            slot = 2 if attentions is not None else 1
            table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", _KEEP)
    return table


# ------------------------------------------------------------------------------------------------- VAE


def _vae_table(vae: torch.nn.Module) -> _Table:
    table: _Table = {
        "quant_conv": ("quant_conv", _KEEP),
        "post_quant_conv": ("post_quant_conv", _KEEP),
    }
    for side in ("encoder", "decoder"):
        coder = getattr(vae, side)
        table[f"{side}.conv_in"] = (f"{side}.conv_in", _KEEP)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", _KEEP)
        table[f"{side}.conv_norm_out"] = (f"{side}.norm_out", _KEEP)
        mid = coder.mid_block
        check_supported(len(mid.resnets) == 2, f"VAE: {side} mid block has {len(mid.resnets)} resnets, expected 2")
        table[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET_RENAMES)
        table[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET_RENAMES)
        attentions = [a for a in (mid.attentions or []) if a is not None]
        check_supported(len(attentions) <= 1, f"VAE: {side} mid block has {len(attentions)} attentions, expected 1")
        if attentions:
            table[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTN_RENAMES)

    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET_RENAMES)
        if block.downsamplers is not None:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", _KEEP)
    # LDM numbers decoder levels from the highest resolution (up.0) while diffusers runs them in order.
    n_up = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = n_up - 1 - i
        for j in range(len(block.resnets)):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET_RENAMES)
        if block.upsamplers is not None:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", _KEEP)
    return table


def convert_vae(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    vae = unwrap(vae)
    check_supported(type(vae).__name__ == "AutoencoderKL", f"VAE: {type(vae).__name__} is not supported")
    converted = _apply_table(vae.state_dict(), _vae_table(vae), "VAE")
    out = {}
    for key, tensor in converted.items():
        # LDM's AttnBlock uses 1x1 Conv2d for q/k/v/proj_out; diffusers uses Linear.
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + key] = tensor
    return out
