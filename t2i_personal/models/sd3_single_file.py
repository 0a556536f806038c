"""SD3 / SD3.5 transformer (MMDiT), diffusers layout <-> ONE original-layout (Stability AI) ``.safetensors`` file.

What it writes
--------------
The key layout of Stability's ``sd3_medium.safetensors`` / ``sd3.5_large.safetensors`` / ``sd3.5_medium.safetensors``
transformer (``pos_embed``, ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}``,
``context_embedder``, ``joint_blocks.{i}.{x_block,context_block}.*``, ``final_layer.*``), every key prefixed with
``model.diffusion_model.`` as in the official single files (which also hold the VAE / text encoders; this file holds
the transformer alone). ComfyUI and diffusers' ``from_single_file`` read it; diffusers strips the prefix itself.
:func:`sd3_transformer_to_original` (keys without the prefix) is the inverse of diffusers'
``loaders.single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers``:

* fused weights are the diffusers parts concatenated on the output axis (rows), weight and bias alike: an
  ``x_block``'s ``attn.qkv`` is ``attn.to_q, to_k, to_v``, its ``attn2.qkv`` (SD3.5 Medium's dual attention) is
  ``attn2.to_{q,k,v}``, a ``context_block``'s ``attn.qkv`` is ``attn.add_{q,k,v}_proj``;
* ``final_layer.adaLN_modulation.1`` is ``norm_out.linear``, and the LAST block's ``context_block.adaLN_modulation.1``
  (that block's context side is "pre_only": no ``attn.proj`` / ``mlp``) is its ``norm1_context.linear``, both with
  their two output halves swapped (SD3 modulates with (shift, scale), diffusers' ``AdaLayerNormContinuous`` with
  (scale, shift));
* SD3.5's q/k RMSNorm weights are ``...attn.ln_q.weight`` / ``...attn.ln_k.weight`` (``attn2.ln_*`` for the dual
  attention); the rest are renames.

Sizes come from the tensors, so any width converts, tiny test models too. A parameter the layout has no name for
(e.g. an unmerged LoRA's ``base_layer`` / ``lora_A``, or a ``layer_norm`` qk norm's bias) raises ValueError instead of
being dropped.

Reading it back
---------------
:func:`load_sd3_transformer_single_file` checks the file's keys and shapes against the config folder (so an SD3.5 file
with an SD3 Medium config fails with a clear message: diffusers alone would load it with weights left missing) and
calls ``SD3Transformer2DModel.from_single_file``, i.e. diffusers' own converter, which (unlike FLUX's) hard-codes no
width. A full checkpoint (VAE / text encoders next to ``model.diffusion_model.*``) is read for its transformer
tensors only.

What is here
------------
SD3's name tables (``JOINT_BLOCK``, ``TOP_LEVEL``) and :func:`original_slot` (with the last block's swapped context
modulation), the three public functions, the full-checkpoint filter and the variant summary in error messages.
Fusing, the atomic write, the header and config reading and the key / shape check are shared with FLUX in
:mod:`.transformer_single_file`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open

from .ldm_keys import unwrap
from .transformer_single_file import (CHECKPOINT_PREFIX, Header, OriginalLayout, Slot, fuse_to_original, linear,
                                      save_original_file, unnamed_parameter)

__all__ = [
    "sd3_transformer_to_original",
    "save_sd3_transformer_single_file",
    "load_sd3_transformer_single_file",
    "original_slot",
]

CONFIG_HINT = (
    "Set model.config_dir to a local diffusers folder of the same SD3 variant as the file (SD3 Medium, SD3.5 Medium "
    "or SD3.5 Large: same width, block count, qk norm, dual-attention blocks and pos_embed size): model_index.json "
    "plus transformer/config.json, no weights needed."
)


# Inside transformer_blocks.{i} -> joint_blocks.{i}.
JOINT_BLOCK = {
    # image side
    **linear("norm1.linear", "x_block.adaLN_modulation.1"),
    **linear("attn.to_q", "x_block.attn.qkv", 0, 3),
    **linear("attn.to_k", "x_block.attn.qkv", 1, 3),
    **linear("attn.to_v", "x_block.attn.qkv", 2, 3),
    "attn.norm_q.weight": Slot("x_block.attn.ln_q.weight"),
    "attn.norm_k.weight": Slot("x_block.attn.ln_k.weight"),
    **linear("attn.to_out.0", "x_block.attn.proj"),
    **linear("attn2.to_q", "x_block.attn2.qkv", 0, 3),
    **linear("attn2.to_k", "x_block.attn2.qkv", 1, 3),
    **linear("attn2.to_v", "x_block.attn2.qkv", 2, 3),
    "attn2.norm_q.weight": Slot("x_block.attn2.ln_q.weight"),
    "attn2.norm_k.weight": Slot("x_block.attn2.ln_k.weight"),
    **linear("attn2.to_out.0", "x_block.attn2.proj"),
    **linear("ff.net.0.proj", "x_block.mlp.fc1"),
    **linear("ff.net.2", "x_block.mlp.fc2"),
    # text side
    **linear("norm1_context.linear", "context_block.adaLN_modulation.1"),  # swapped in the last block
    **linear("attn.add_q_proj", "context_block.attn.qkv", 0, 3),
    **linear("attn.add_k_proj", "context_block.attn.qkv", 1, 3),
    **linear("attn.add_v_proj", "context_block.attn.qkv", 2, 3),
    "attn.norm_added_q.weight": Slot("context_block.attn.ln_q.weight"),
    "attn.norm_added_k.weight": Slot("context_block.attn.ln_k.weight"),
    **linear("attn.to_add_out", "context_block.attn.proj"),
    **linear("ff_context.net.0.proj", "context_block.mlp.fc1"),
    **linear("ff_context.net.2", "context_block.mlp.fc2"),
}
CONTEXT_MODULATION = "norm1_context.linear."
TOP_LEVEL = {
    "pos_embed.pos_embed": Slot("pos_embed"),
    **linear("pos_embed.proj", "x_embedder.proj"),
    **linear("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    **linear("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    **linear("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    **linear("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    **linear("context_embedder", "context_embedder"),
    **linear("norm_out.linear", "final_layer.adaLN_modulation.1", swapped=True),
    **linear("proj_out", "final_layer.linear"),
}


def original_slot(diffusers_key: str, last_block: int | None = None) -> Slot:
    """The original-layout slot (without ``model.diffusion_model.``) of an ``SD3Transformer2DModel`` state-dict key;
    ValueError if it has none. ``last_block`` is the index of the model's last (context "pre_only") block, whose
    ``norm1_context.linear`` has its halves swapped."""
    if match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", diffusers_key):
        index, inner = match.groups()
        if inner in JOINT_BLOCK:
            slot = JOINT_BLOCK[inner]
            swapped = inner.startswith(CONTEXT_MODULATION) and int(index) == last_block
            return slot._replace(original=f"joint_blocks.{index}.{slot.original}", swapped=swapped)
    elif diffusers_key in TOP_LEVEL:
        return TOP_LEVEL[diffusers_key]
    raise unnamed_parameter("SD3", diffusers_key)


def sd3_transformer_to_original(transformer: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel``'s weights under the original SD3 keys, without the ``model.diffusion_model.``
    prefix (see the module docstring).

    Unfused tensors are detached views of the parameters (clone before changing them); fused and swapped ones
    are new tensors. Works on the meta device too (keys and shapes without weights).
    """
    state = unwrap(transformer).state_dict()
    if "pos_embed.pos_embed" not in state:
        raise ValueError(
            "the transformer has no stored pos_embed (its config has pos_embed_max_size=None); the original SD3 "
            "layout needs one: every SD3 / SD3.5 config sets pos_embed_max_size (192 or 384)")
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"transformer_blocks\.(\d+)\.", key))}
    last_block = max(blocks, default=None)
    return fuse_to_original(state, lambda key: original_slot(key, last_block))


def save_sd3_transformer_single_file(
    transformer: SD3Transformer2DModel,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write :func:`sd3_transformer_to_original` to ``path`` as safetensors, every key prefixed with
    ``model.diffusion_model.``, atomically (a temp file in the same folder, then ``os.replace``). ``dtype`` casts
    floating tensors (Stability ships ``torch.float16`` for SD3 Medium, ``torch.bfloat16`` for SD3.5); ``metadata``
    values are stored as strings in the header. Returns the path."""
    return save_original_file(sd3_transformer_to_original(transformer), path, dtype, metadata, CHECKPOINT_PREFIX)


# ---------------------------------------------------------------------------------------------- loading


def load_sd3_transformer_single_file(
    path: str | os.PathLike,
    config_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> SD3Transformer2DModel:
    """An ``SD3Transformer2DModel`` from an original-layout SD3 / SD3.5 ``.safetensors`` file (keys with or without
    ``model.diffusion_model.``; a full checkpoint's VAE / text encoders are skipped) and the architecture config in
    ``config_dir``: a diffusers pipeline folder (``transformer/config.json``), the transformer folder itself, or a
    Hub repo id.

    Raises FileNotFoundError / OSError for a missing or unreadable file or config, ValueError (naming the file and
    the config, with what to do) when the file does not fit the config or diffusers cannot load it.
    """
    return LAYOUT.load(path, config_dir, dtype, _source)


def _source(path: Path, header: Header, skeleton: SD3Transformer2DModel) -> str | dict[str, torch.Tensor]:
    """The file itself, or for a full checkpoint its transformer tensors only (not the VAE / text encoders)."""
    if not header.others:
        return str(path)
    with safe_open(str(path), framework="pt") as file:
        return {header.prefix + key: file.get_tensor(header.prefix + key) for key in header.shapes}


def _describe(shapes: Mapping[str, tuple]) -> str:
    """Width, block count, qk norm, dual-attention blocks and pos_embed grid of an original-layout key set, e.g. to
    tell SD3 Medium (no qk norm) from SD3.5 Medium (qk norm, dual attention, 384 grid) and SD3.5 Large."""
    width = shapes.get("x_embedder.proj.weight", ("?",))[0]
    blocks = {int(key.split(".")[1]) for key in shapes if key.startswith("joint_blocks.")}
    dual = sorted({int(key.split(".")[1]) for key in shapes if re.match(r"joint_blocks\.\d+\.x_block\.attn2\.", key)})
    qk_norm = ("with qk norm (qk_norm='rms_norm', SD3.5-like)" if any(".ln_q." in key for key in shapes)
               else "without qk norm (qk_norm=None, SD3-Medium-like)")
    dual_text = f"dual attention in blocks {dual}" if dual else "no dual attention"
    pos = shapes.get("pos_embed", (0, 0))[1]
    grid = f"pos_embed {math.isqrt(pos)}x{math.isqrt(pos)}" if pos else "no pos_embed"
    return f"{width} wide with {len(blocks)} joint blocks, {qk_norm}, {dual_text}, {grid}"


LAYOUT = OriginalLayout(
    name="SD3", article="an", file_kind="SD3", blocks="joint_blocks", model_class=SD3Transformer2DModel,
    to_original=sd3_transformer_to_original, describe=_describe,
    contrast="the file is {file}; the config's model is {config}", config_hint=CONFIG_HINT,
    config_errors=(TypeError, ValueError),  # e.g. pos_embed_max_size=None, which the layout cannot hold
)
