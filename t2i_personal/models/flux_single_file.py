"""FLUX.1 transformer, diffusers layout <-> ONE original-layout (Black Forest Labs) ``.safetensors`` file.

What it writes
--------------
The key layout of BFL's ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` (``img_in``, ``txt_in``,
``time_in``, ``vector_in``, ``guidance_in``, ``double_blocks.{i}.*``, ``single_blocks.{i}.*``, ``final_layer.*``),
with no ``model.diffusion_model.`` prefix: the transformer-only file ComfyUI, Forge and diffusers'
``from_single_file`` load. :func:`flux_transformer_to_original` is the inverse of diffusers'
``loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers``:

* fused weights are the diffusers parts concatenated on the output axis (rows), weight and bias alike: a double
  block's ``img_attn.qkv`` is ``attn.to_q, to_k, to_v``, its ``txt_attn.qkv`` is ``attn.add_{q,k,v}_proj``, and a
  single block's ``linear1`` is ``attn.to_q, to_k, to_v, proj_mlp``;
* ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its two output halves swapped (FLUX's final
  modulation outputs (shift, scale), diffusers' (scale, shift));
* the q/k RMSNorm weights are ``...norm.query_norm.scale`` / ``...norm.key_norm.scale``; the rest are renames.

Sizes come from the tensors, so any width converts, tiny test models too. A parameter the layout has no name for
(e.g. an unmerged LoRA's ``base_layer`` / ``lora_A``) raises ValueError instead of being dropped. With FLUX.1-dev's
config the file has exactly the official 780 keys (FLUX.1-schnell: 776, no ``guidance_in``).

Reading it back
---------------
:func:`load_flux_transformer_single_file` checks the file's keys and shapes against the config folder (so a dev
file with a schnell config fails with a clear message) and calls ``FluxTransformer2DModel.from_single_file``.
diffusers' converter hard-codes FLUX.1's width (3072) when it splits ``linear1``; for other widths (tiny models)
the loader splits the file itself, with the same name table, and hands diffusers the diffusers-layout weights.

What is here
------------
FLUX's name tables (``DOUBLE_BLOCK``, ``SINGLE_BLOCK``, ``TOP_LEVEL``) and :func:`original_slot`, the three public
functions, the split at other widths and the dev / schnell summary in error messages. Fusing, the atomic write, the
header and config reading and the key / shape check are shared with SD3 in :mod:`.transformer_single_file`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from .ldm_keys import unwrap
from .transformer_single_file import (Header, OriginalLayout, Slot, fuse_to_original, linear, save_original_file,
                                      swap_halves, unnamed_parameter)

__all__ = [
    "flux_transformer_to_original",
    "save_flux_transformer_single_file",
    "load_flux_transformer_single_file",
    "original_slot",
]

# The model width diffusers' converter assumes when it splits single_blocks.{i}.linear1 (FLUX.1's).
DIFFUSERS_CONVERTER_WIDTH = 3072
CONFIG_HINT = (
    "Set model.config_dir to a local diffusers folder of the same FLUX variant as the file (FLUX.1-dev vs "
    "FLUX.1-schnell, same width and block counts): model_index.json plus transformer/config.json, no weights needed."
)

# Inside transformer_blocks.{i} -> double_blocks.{i}.
DOUBLE_BLOCK = {
    **linear("norm1.linear", "img_mod.lin"),
    **linear("attn.to_q", "img_attn.qkv", 0, 3),
    **linear("attn.to_k", "img_attn.qkv", 1, 3),
    **linear("attn.to_v", "img_attn.qkv", 2, 3),
    "attn.norm_q.weight": Slot("img_attn.norm.query_norm.scale"),
    "attn.norm_k.weight": Slot("img_attn.norm.key_norm.scale"),
    **linear("attn.to_out.0", "img_attn.proj"),
    **linear("ff.net.0.proj", "img_mlp.0"),
    **linear("ff.net.2", "img_mlp.2"),
    **linear("norm1_context.linear", "txt_mod.lin"),
    **linear("attn.add_q_proj", "txt_attn.qkv", 0, 3),
    **linear("attn.add_k_proj", "txt_attn.qkv", 1, 3),
    **linear("attn.add_v_proj", "txt_attn.qkv", 2, 3),
    "attn.norm_added_q.weight": Slot("txt_attn.norm.query_norm.scale"),
    "attn.norm_added_k.weight": Slot("txt_attn.norm.key_norm.scale"),
    **linear("attn.to_add_out", "txt_attn.proj"),
    **linear("ff_context.net.0.proj", "txt_mlp.0"),
    **linear("ff_context.net.2", "txt_mlp.2"),
}
# Inside single_transformer_blocks.{i} -> single_blocks.{i}.
SINGLE_BLOCK = {
    **linear("norm.linear", "modulation.lin"),
    **linear("attn.to_q", "linear1", 0, 4),
    **linear("attn.to_k", "linear1", 1, 4),
    **linear("attn.to_v", "linear1", 2, 4),
    **linear("proj_mlp", "linear1", 3, 4),
    "attn.norm_q.weight": Slot("norm.query_norm.scale"),
    "attn.norm_k.weight": Slot("norm.key_norm.scale"),
    **linear("proj_out", "linear2"),
}
TOP_LEVEL = {
    **linear("x_embedder", "img_in"),
    **linear("context_embedder", "txt_in"),
    **linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    **linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    **linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    **linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    **linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    **linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    **linear("norm_out.linear", "final_layer.adaLN_modulation.1", swapped=True),  # FLUX: (shift, scale)
    **linear("proj_out", "final_layer.linear"),
}


def original_slot(diffusers_key: str) -> Slot:
    """The original-layout slot of a ``FluxTransformer2DModel`` state-dict key; ValueError if it has none."""
    if match := re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.+)", diffusers_key):
        single, index, inner = match.groups()
        table, block = (SINGLE_BLOCK, "single_blocks") if single else (DOUBLE_BLOCK, "double_blocks")
        if inner in table:
            slot = table[inner]
            return slot._replace(original=f"{block}.{index}.{slot.original}")
    elif diffusers_key in TOP_LEVEL:
        return TOP_LEVEL[diffusers_key]
    raise unnamed_parameter("FLUX", diffusers_key)


def flux_transformer_to_original(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel``'s weights under the original BFL keys (see the module docstring).

    Unfused tensors are detached views of the parameters (clone before changing them); fused and swapped ones
    are new tensors. Works on the meta device too (keys and shapes without weights).
    """
    return fuse_to_original(unwrap(transformer).state_dict(), original_slot)


def save_flux_transformer_single_file(
    transformer: FluxTransformer2DModel,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write :func:`flux_transformer_to_original` to ``path`` as safetensors, atomically (a temp file in the same
    folder, then ``os.replace``). ``dtype`` casts floating tensors (``torch.bfloat16`` is what BFL ships);
    ``metadata`` values are stored as strings in the header. Returns the path."""
    return save_original_file(flux_transformer_to_original(transformer), path, dtype, metadata)


# ---------------------------------------------------------------------------------------------- loading


def load_flux_transformer_single_file(
    path: str | os.PathLike,
    config_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> FluxTransformer2DModel:
    """A ``FluxTransformer2DModel`` from an original-layout FLUX.1 ``.safetensors`` file (transformer-only, or a
    full checkpoint with ``model.diffusion_model.`` keys) and the architecture config in ``config_dir``: a diffusers
    pipeline folder (``transformer/config.json``), the transformer folder itself, or a Hub repo id.

    Raises FileNotFoundError / OSError for a missing or unreadable file or config, ValueError (naming the file and
    the config, with what to do) when the file does not fit the config or diffusers cannot load it.
    """
    return LAYOUT.load(path, config_dir, dtype, _source)


def _source(path: Path, header: Header, skeleton: FluxTransformer2DModel) -> str | dict[str, torch.Tensor]:
    """The file itself for diffusers' converter at FLUX.1's width; at other widths, its diffusers-layout weights."""
    if header.shapes["img_in.weight"][0] == DIFFUSERS_CONVERTER_WIDTH:
        return str(path)
    return _original_to_diffusers(load_file(str(path)), header.prefix, skeleton)


def _describe(shapes: Mapping[str, tuple]) -> str:
    """Width, block counts and guidance of an original-layout key set, e.g. to tell FLUX.1-dev from -schnell."""
    width = shapes.get("img_in.weight", ("?",))[0]
    double, single = ({key.split(".")[1] for key in shapes if key.startswith(f"{kind}.")}
                      for kind in ("double_blocks", "single_blocks"))
    guidance = ("with guidance_in (guidance_embeds=True, FLUX.1-dev-like)" if "guidance_in.in_layer.weight" in shapes
                else "without guidance_in (guidance_embeds=False, FLUX.1-schnell-like)")
    return f"{width} wide with {len(double)} double and {len(single)} single blocks, {guidance}"


def _original_to_diffusers(original: Mapping[str, torch.Tensor], prefix: str,
                           skeleton: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flux_transformer_to_original` for a file already checked against the skeleton's keys
    and shapes: fused tensors are cut into the skeleton's parameter sizes, in part order."""
    sizes = {key: t.shape[0] for key, t in skeleton.state_dict().items()}
    slots = sorted(((original_slot(key), key) for key in sizes), key=lambda item: item[0].part)
    next_row: dict[str, int] = {}
    diffusers = {}
    for slot, key in slots:
        tensor = original[prefix + slot.original]
        if slot.swapped:
            tensor = swap_halves(tensor)
        if slot.parts > 1:
            start = next_row.get(slot.original, 0)
            tensor = tensor[start:start + sizes[key]]
            next_row[slot.original] = start + sizes[key]
        diffusers[key] = tensor
    return diffusers


LAYOUT = OriginalLayout(
    name="FLUX", article="a", file_kind="FLUX.1", blocks="double_blocks", model_class=FluxTransformer2DModel,
    to_original=flux_transformer_to_original, describe=_describe,
    contrast="the file is {file}, the config's model {config}", config_hint=CONFIG_HINT,
)
