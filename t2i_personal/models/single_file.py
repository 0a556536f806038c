"""Export diffusers-format Stable Diffusion models as ONE original-layout ``.safetensors`` checkpoint.

What it writes
--------------
The CompVis/Stability "LDM" key layout of the official SD 1.x / 2.x / SDXL release files, the "checkpoint"
format AUTOMATIC1111, ComfyUI and kohya's sd-scripts load and ``diffusers``' ``from_single_file`` converts
(only the diffusers loader is exercised by the tests):

* UNet          -> ``model.diffusion_model.{input_blocks,middle_block,output_blocks,time_embed,label_emb,out}.*``
* VAE           -> ``first_stage_model.{encoder,decoder,quant_conv,post_quant_conv}.*`` (mid-block attention
  q/k/v/proj_out stored as 1x1 convolutions, ``[C, C, 1, 1]``, as the LDM code defines them)
* text encoder  -> SD 1.x: ``cond_stage_model.transformer.text_model.*`` (OpenAI CLIP, transformers naming);
  SD 2.x (an OpenCLIP text encoder, recognised by ``hidden_act == "gelu"``):
  ``cond_stage_model.model.*`` (OpenCLIP naming, fused ``in_proj``)
* SDXL          -> ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP bigG, fused ``attn.in_proj_weight``/``in_proj_bias`` and
  ``text_projection`` stored transposed, ``[hidden, projection_dim]``)

The mapping is derived from the module structure (number of blocks, resnets per block, which blocks carry
attention / down- / up-samplers), so tiny test models convert as well as SD 1.5 / 2.1 / SDXL. Every
parameter of the given modules is mapped; anything the LDM layout has no place for (e.g. ``encoder_hid_proj``,
per-block ``layers_per_block`` lists, ``UNetMidBlock2D`` without attention) raises instead of being dropped.

Reading it back
---------------
With diffusers (checked against 0.42.1 by ``tests/test_single_file.py``, parameters bit-identical)::

    pipe = StableDiffusionPipeline.from_single_file(
        "model.safetensors", config="path/to/diffusers_folder", local_files_only=True
    )
    pipe = StableDiffusionXLPipeline.from_single_file(
        "model_xl.safetensors", config="path/to/diffusers_xl_folder", local_files_only=True
    )

``config`` is a local diffusers pipeline folder (``model_index.json`` plus per-component ``config.json``,
scheduler and tokenizer files; weights in it are not needed) with the same architecture; model configs,
scheduler and tokenizer come from there, all weights from the file. Without ``config`` diffusers guesses the
architecture from a few keys (``infer_diffusers_model_type``) and fetches a stock config from the Hub, which
only works for full-size SD 1.5 / 2.x / SDXL and needs network access or a warm HF cache.

Limits
------
* UNet: ``UNet2DConditionModel`` with ``CrossAttnDownBlock2D``/``DownBlock2D``,
  ``CrossAttnUpBlock2D``/``UpBlock2D``, ``UNetMidBlock2DCrossAttn``, an integer ``layers_per_block``; optional
  ``class_embedding`` / ``add_embedding`` (SDXL ``text_time``) go to ``label_emb``.
* VAE: ``AutoencoderKL`` (any number of blocks and resnets per block).
* SD 2.x: diffusers' SD 2 text encoder has 23 layers (the 24th of OpenCLIP ViT-H is unused by SD 2 and was
  dropped on conversion); the file gets those 23 only. diffusers' loader discards ``resblocks.23`` of a
  ``cond_stage_model.model`` encoder, so a 24+-layer OpenCLIP encoder is refused here.
* SDXL: diffusers tells its two text encoders apart by hidden size; if both have the same width (only
  possible with toy models) ``from_single_file`` would load the wrong one, so that raises.
  The refiner layout (OpenCLIP only, at ``conditioner.embedders.0.model``) is not written.
* Only learned parameters are written: no ``...embeddings.position_ids`` (a non-persistent buffer in current
  transformers) and no OpenCLIP ``logit_scale`` (unused for text-to-image). With full-size configs the file
  has exactly the official key sets minus those: SD 1.5 1130 keys (686 UNet, 248 VAE, 196 CLIP), SDXL base
  2513; ``infer_diffusers_model_type`` reports ``v1`` / ``v2`` / ``xl_base`` for them.
* No EMA weights, no ``model_ema.*``, no VAE-only or UNet-only files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "diffusers_to_original_sd",
    "diffusers_to_original_sdxl",
    "save_original_sd_checkpoint",
    "save_original_sdxl_checkpoint",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "SD1_TEXT_PREFIX",
    "SD2_TEXT_PREFIX",
    "SDXL_TEXT_PREFIX",
    "SDXL_TEXT2_PREFIX",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

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


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
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


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise NotImplementedError(message)


# ------------------------------------------------------------------------------------------------ UNet


def _unet_table(unet: torch.nn.Module) -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
    config = unet.config
    lpb = config.layers_per_block
    _check(
        isinstance(lpb, int),
        f"UNet: layers_per_block={lpb!r} per block; the original layout (and diffusers' loader) need one integer",
    )
    table: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
        "conv_in": ("input_blocks.0.0", _KEEP),
        "time_embedding.linear_1": ("time_embed.0", _KEEP),
        "time_embedding.linear_2": ("time_embed.2", _KEEP),
        "conv_norm_out": ("out.0", _KEEP),
        "conv_out": ("out.2", _KEEP),
    }

    class_embedding = getattr(unet, "class_embedding", None)
    if isinstance(class_embedding, torch.nn.Embedding):  # num_class_embeds (x4 upscaler)
        table["class_embedding"] = ("label_emb", _KEEP)
    elif class_embedding is not None:
        _check(
            config.class_embed_type in ("timestep", "projection"),
            f"UNet: class_embed_type={config.class_embed_type!r} has no original-layout equivalent",
        )
        table["class_embedding.linear_1"] = ("label_emb.0.0", _KEEP)
        table["class_embedding.linear_2"] = ("label_emb.0.2", _KEEP)
    if getattr(unet, "add_embedding", None) is not None:
        _check(
            config.addition_embed_type == "text_time",
            f"UNet: addition_embed_type={config.addition_embed_type!r} is not supported (only SDXL's 'text_time')",
        )
        _check(class_embedding is None, "UNet: class_embedding and add_embedding would both need label_emb")
        table["add_embedding.linear_1"] = ("label_emb.0.0", _KEEP)
        table["add_embedding.linear_2"] = ("label_emb.0.2", _KEEP)

    # input_blocks: 0 is conv_in; then per down block `lpb` x (resnet[, attention]) and, except after the
    # last block, one downsampler (`input_blocks.N.0.op`).
    index = 1
    n_down = len(unet.down_blocks)
    for b, block in enumerate(unet.down_blocks):
        name = type(block).__name__
        _check(name in _UNET_DOWN_TYPES, f"UNet: down block type {name} is not supported")
        _check(len(block.resnets) == lpb, f"UNet: down_blocks.{b} has {len(block.resnets)} resnets, expected {lpb}")
        attentions = getattr(block, "attentions", None)
        _check(
            attentions is None or len(attentions) == lpb,
            f"UNet: down_blocks.{b} has {len(attentions or [])} attentions for {lpb} resnets",
        )
        for j in range(lpb):
            table[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if attentions is not None:
                table[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{index}.1", _KEEP)
            index += 1
        has_down = block.downsamplers is not None
        _check(has_down == (b < n_down - 1), f"UNet: down_blocks.{b} downsampler placement is not the SD one")
        if has_down:
            _check(len(block.downsamplers) == 1, f"UNet: down_blocks.{b} has several downsamplers")
            table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", _KEEP)
            index += 1

    mid = unet.mid_block
    _check(
        mid is not None and type(mid).__name__ == "UNetMidBlock2DCrossAttn",
        f"UNet: mid block {type(mid).__name__} is not supported (the original layout is resnet, attention, resnet)",
    )
    _check(len(mid.resnets) == 2 and len(mid.attentions) == 1, "UNet: mid block must have 2 resnets, 1 attention")
    table["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET_RENAMES)
    table["mid_block.attentions.0"] = ("middle_block.1", _KEEP)
    table["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET_RENAMES)

    # output_blocks: per up block `lpb + 1` x (resnet[, attention]); the upsampler sits in the last one, after
    # the attention if there is one (`output_blocks.N.2.conv`) or right after the resnet (`.1.conv`).
    index = 0
    n_up = len(unet.up_blocks)
    for b, block in enumerate(unet.up_blocks):
        name = type(block).__name__
        _check(name in _UNET_UP_TYPES, f"UNet: up block type {name} is not supported")
        n = lpb + 1
        _check(len(block.resnets) == n, f"UNet: up_blocks.{b} has {len(block.resnets)} resnets, expected {n}")
        attentions = getattr(block, "attentions", None)
        _check(
            attentions is None or len(attentions) == n,
            f"UNet: up_blocks.{b} has {len(attentions or [])} attentions for {n} resnets",
        )
        for j in range(n):
            table[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if attentions is not None:
                table[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{index}.1", _KEEP)
            index += 1
        has_up = block.upsamplers is not None
        _check(has_up == (b < n_up - 1), f"UNet: up_blocks.{b} upsampler placement is not the SD one")
        if has_up:
            _check(len(block.upsamplers) == 1, f"UNet: up_blocks.{b} has several upsamplers")
            slot = 2 if attentions is not None else 1
            table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", _KEEP)
    return table


def _convert_unet(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    unet = _unwrap(unet)
    _check(type(unet).__name__ == "UNet2DConditionModel", f"UNet: {type(unet).__name__} is not supported")
    converted = _apply_table(unet.state_dict(), _unet_table(unet), "UNet")
    return {UNET_PREFIX + k: v for k, v in converted.items()}


# ------------------------------------------------------------------------------------------------- VAE


def _vae_table(vae: torch.nn.Module) -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
    table: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
        "quant_conv": ("quant_conv", _KEEP),
        "post_quant_conv": ("post_quant_conv", _KEEP),
    }
    for side in ("encoder", "decoder"):
        coder = getattr(vae, side)
        table[f"{side}.conv_in"] = (f"{side}.conv_in", _KEEP)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", _KEEP)
        table[f"{side}.conv_norm_out"] = (f"{side}.norm_out", _KEEP)
        mid = coder.mid_block
        _check(len(mid.resnets) == 2, f"VAE: {side} mid block has {len(mid.resnets)} resnets, expected 2")
        table[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET_RENAMES)
        table[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET_RENAMES)
        attentions = [a for a in (mid.attentions or []) if a is not None]
        _check(len(attentions) <= 1, f"VAE: {side} mid block has {len(attentions)} attentions, expected 1")
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


def _convert_vae(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    vae = _unwrap(vae)
    _check(type(vae).__name__ == "AutoencoderKL", f"VAE: {type(vae).__name__} is not supported")
    converted = _apply_table(vae.state_dict(), _vae_table(vae), "VAE")
    out = {}
    for key, tensor in converted.items():
        # LDM's AttnBlock uses 1x1 Conv2d for q/k/v/proj_out; diffusers uses Linear.
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + key] = tensor
    return out


# ---------------------------------------------------------------------------------------- text encoders


def _clip_state_dict(text_encoder: torch.nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Text-model parameters without the ``text_model.`` wrapper (transformers 4.x and 5.x), plus the
    ``text_projection`` weight of a ``CLIPTextModelWithProjection`` (else None)."""
    state = _unwrap(text_encoder).state_dict()
    projection = state.pop("text_projection.weight", None)
    body = {k.removeprefix("text_model."): v for k, v in state.items()}
    unknown = [k for k in body if not k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))]
    _check(not unknown, f"text encoder: unexpected parameters {unknown[:8]}")
    return body, projection


def _convert_clip_transformers(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP in the transformers naming the LDM code used (``FrozenCLIPEmbedder.transformer``)."""
    body, projection = _clip_state_dict(text_encoder)
    _check(projection is None, "text encoder: a projection head has no place in the transformers CLIP layout")
    return {f"{prefix}text_model.{k}": v for k, v in body.items()}


_OPEN_CLIP_LAYER_RENAMES = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def _convert_open_clip(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP naming (``FrozenOpenCLIPEmbedder.model``): fused q/k/v ``in_proj``, ``text_projection`` as a
    ``[hidden, proj]`` matrix (``x @ text_projection``) instead of a Linear weight."""
    body, projection = _clip_state_dict(text_encoder)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    for key, tensor in body.items():
        if key in fixed:
            out[prefix + fixed[key]] = tensor
            continue
        parts = key.split(".")  # encoder.layers.<n>.<rest...>
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            raise NotImplementedError(f"text encoder: no OpenCLIP name for {key!r}")
        layer, rest = parts[2], ".".join(parts[3:])
        if rest.startswith("self_attn.") and parts[4] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault((layer, parts[-1]), {})[parts[4]] = tensor
            continue
        for old, new in _OPEN_CLIP_LAYER_RENAMES:
            if rest.startswith(old):
                out[f"{prefix}transformer.resblocks.{layer}.{new}{rest[len(old):]}"] = tensor
                break
        else:
            raise NotImplementedError(f"text encoder: no OpenCLIP name for {key!r}")
    for (layer, kind), parts_ in qkv.items():
        _check(set(parts_) == {"q_proj", "k_proj", "v_proj"}, f"text encoder: layer {layer} lacks q/k/v {kind}")
        fused = torch.cat([parts_["q_proj"], parts_["k_proj"], parts_["v_proj"]], dim=0)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    if projection is not None:
        out[prefix + "text_projection"] = projection.T
    return out


def _is_open_clip(text_encoder: torch.nn.Module) -> bool:
    # OpenAI's CLIP (SD 1.x, SDXL encoder 1) uses quick_gelu; the LAION OpenCLIP encoders of SD 2.x and
    # SDXL's encoder 2 use exact gelu.
    return getattr(_unwrap(text_encoder).config, "hidden_act", "quick_gelu") == "gelu"


# ------------------------------------------------------------------------------------------------ API


def diffusers_to_original_sd(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """SD 1.x / 2.x components (diffusers layout) -> one original-layout state dict.

    The tensors are the models' own (no copy, except the VAE attention reshape views), on their device and
    dtype. An SD 1.x ``CLIPTextModel`` goes to ``cond_stage_model.transformer.text_model.*``; an OpenCLIP one
    (``hidden_act == "gelu"``, i.e. SD 2.x) to ``cond_stage_model.model.*``.
    """
    state = {**_convert_unet(unet), **_convert_vae(vae)}
    if _is_open_clip(text_encoder):
        n_layers = _unwrap(text_encoder).config.num_hidden_layers
        _check(
            n_layers <= 23,
            f"text encoder: OpenCLIP-style encoder with {n_layers} layers; diffusers' single-file loader drops "
            "cond_stage_model.model.transformer.resblocks.23 (SD 2.x uses 23 of ViT-H's 24), so it would not round-trip",
        )
        state.update(_convert_open_clip(text_encoder, SD2_TEXT_PREFIX))
    else:
        state.update(_convert_clip_transformers(text_encoder, SD1_TEXT_PREFIX))
    return state


def diffusers_to_original_sdxl(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
) -> dict[str, torch.Tensor]:
    """SDXL base components (diffusers layout) -> one original-layout (``sd_xl_base``) state dict."""
    width_1 = _unwrap(text_encoder).config.hidden_size
    width_2 = _unwrap(text_encoder_2).config.hidden_size
    if width_1 == width_2:
        raise ValueError(
            f"Both text encoders are {width_1} wide; diffusers' from_single_file tells them apart by the width of "
            "the position embedding and would load text_encoder_2 from embedders.0."
        )
    _, projection = _clip_state_dict(text_encoder_2)
    _check(projection is not None, "SDXL: text_encoder_2 must be a CLIPTextModelWithProjection")
    state = {**_convert_unet(unet), **_convert_vae(vae)}
    state.update(_convert_clip_transformers(text_encoder, SDXL_TEXT_PREFIX))
    state.update(_convert_open_clip(text_encoder_2, SDXL_TEXT2_PREFIX))
    return state


def _write_safetensors(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    metadata: Mapping[str, object] | None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        # safetensors refuses tensors that share storage; views of model parameters stay views after
        # .contiguous() when already contiguous, so give any repeat its own copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    meta = {"format": "pt"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_original_sd_checkpoint(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write :func:`diffusers_to_original_sd` to ``path`` (safetensors, atomic replace).

    ``dtype`` casts floating tensors (e.g. ``torch.float16`` for a half-size file); ``metadata`` values are
    stored as strings in the safetensors header. Returns the path.
    """
    return _write_safetensors(diffusers_to_original_sd(unet, vae, text_encoder), path, dtype, metadata)


def save_original_sdxl_checkpoint(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write :func:`diffusers_to_original_sdxl` to ``path`` (safetensors, atomic replace)."""
    state = diffusers_to_original_sdxl(unet, vae, text_encoder, text_encoder_2)
    return _write_safetensors(state, path, dtype, metadata)

