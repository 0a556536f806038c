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
The UNet and VAE tables live in :mod:`.ldm_keys`; this module adds the text encoders and writes the file.

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
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path
from .ldm_keys import UNET_PREFIX, VAE_PREFIX, check_supported, convert_unet, convert_vae, unwrap

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

SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."


# ---------------------------------------------------------------------------------------- text encoders


def _clip_state_dict(text_encoder: torch.nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Text-model parameters without the ``text_model.`` wrapper (transformers 4.x and 5.x), plus the
    ``text_projection`` weight of a ``CLIPTextModelWithProjection`` (else None)."""
    state = unwrap(text_encoder).state_dict()
    projection = state.pop("text_projection.weight", None)
    body = {k.removeprefix("text_model."): v for k, v in state.items()}
    unknown = [k for k in body if not k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))]
    check_supported(not unknown, f"text encoder: unexpected parameters {unknown[:8]}")
    return body, projection


def _convert_clip_transformers(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP in the transformers naming the LDM code used (``FrozenCLIPEmbedder.transformer``)."""
    body, projection = _clip_state_dict(text_encoder)
    check_supported(projection is None, "text encoder: a projection head has no place in the transformers CLIP layout")
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
        check_supported(set(parts_) == {"q_proj", "k_proj", "v_proj"},
                        f"text encoder: layer {layer} lacks q/k/v {kind}")
        fused = torch.cat([parts_["q_proj"], parts_["k_proj"], parts_["v_proj"]], dim=0)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    if projection is not None:
        out[prefix + "text_projection"] = projection.T
    return out


def _is_open_clip(text_encoder: torch.nn.Module) -> bool:
    # OpenAI's CLIP (SD 1.x, SDXL encoder 1) uses quick_gelu; the LAION OpenCLIP encoders of SD 2.x and
    # SDXL's encoder 2 use exact gelu.
    return getattr(unwrap(text_encoder).config, "hidden_act", "quick_gelu") == "gelu"


# ------------------------------------------------------------------------------------------------ API


def diffusers_to_original_sd(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """SD 1.x / 2.x components (diffusers layout) -> one original-layout state dict.

    The tensors are the models' own (no copy, except the VAE attention reshape views), on their device and
    dtype. An SD 1.x ``CLIPTextModel`` goes to ``cond_stage_model.transformer.text_model.*``; an OpenCLIP one
    (``hidden_act == "gelu"``, i.e. SD 2.x) to ``cond_stage_model.model.*``.
    """
    state = {**convert_unet(unet), **convert_vae(vae)}
    if _is_open_clip(text_encoder):
        n_layers = unwrap(text_encoder).config.num_hidden_layers
        check_supported(
            n_layers <= 23,
            f"text encoder: OpenCLIP-style encoder with {n_layers} layers; diffusers' single-file loader drops "
            "cond_stage_model.model.transformer.resblocks.23 (SD 2.x uses 23 of ViT-H's 24), so it would not "
            "round-trip",
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
    width_1 = unwrap(text_encoder).config.hidden_size
    width_2 = unwrap(text_encoder_2).config.hidden_size
    if width_1 == width_2:
        raise ValueError(
            f"Both text encoders are {width_1} wide; diffusers' from_single_file tells them apart by the width of "
            "the position embedding and would load text_encoder_2 from embedders.0."
        )
    _, projection = _clip_state_dict(text_encoder_2)
    check_supported(projection is not None, "SDXL: text_encoder_2 must be a CLIPTextModelWithProjection")
    state = {**convert_unet(unet), **convert_vae(vae)}
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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
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

