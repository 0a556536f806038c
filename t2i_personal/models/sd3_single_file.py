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
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import SD3Transformer2DModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from .ldm_keys import unwrap

__all__ = [
    "sd3_transformer_to_original",
    "save_sd3_transformer_single_file",
    "load_sd3_transformer_single_file",
    "original_slot",
]

# The prefix Stability's single files (and ComfyUI / A1111 checkpoints) put before the transformer's keys.
CHECKPOINT_PREFIX = "model.diffusion_model."
FINAL_MODULATION = "final_layer.adaLN_modulation.1."
CONFIG_HINT = (
    "Set model.config_dir to a local diffusers folder of the same SD3 variant as the file (SD3 Medium, SD3.5 Medium "
    "or SD3.5 Large: same width, block count, qk norm, dual-attention blocks and pos_embed size): model_index.json "
    "plus transformer/config.json, no weights needed."
)


class Slot(NamedTuple):
    """Where a diffusers parameter goes in the original layout: ``original`` key, for a fused weight which ``part``
    of how many ``parts`` (stacked on the output axis, in part order), and whether its two output halves are swapped
    ((scale, shift) <-> (shift, scale))."""

    original: str
    part: int = 0
    parts: int = 1
    swapped: bool = False


def _linear(diffusers: str, original: str, part: int = 0, parts: int = 1) -> dict[str, Slot]:
    return {f"{diffusers}.{p}": Slot(f"{original}.{p}", part, parts) for p in ("weight", "bias")}


# Inside transformer_blocks.{i} -> joint_blocks.{i}.
JOINT_BLOCK = {
    # image side
    **_linear("norm1.linear", "x_block.adaLN_modulation.1"),
    **_linear("attn.to_q", "x_block.attn.qkv", 0, 3),
    **_linear("attn.to_k", "x_block.attn.qkv", 1, 3),
    **_linear("attn.to_v", "x_block.attn.qkv", 2, 3),
    "attn.norm_q.weight": Slot("x_block.attn.ln_q.weight"),
    "attn.norm_k.weight": Slot("x_block.attn.ln_k.weight"),
    **_linear("attn.to_out.0", "x_block.attn.proj"),
    **_linear("attn2.to_q", "x_block.attn2.qkv", 0, 3),
    **_linear("attn2.to_k", "x_block.attn2.qkv", 1, 3),
    **_linear("attn2.to_v", "x_block.attn2.qkv", 2, 3),
    "attn2.norm_q.weight": Slot("x_block.attn2.ln_q.weight"),
    "attn2.norm_k.weight": Slot("x_block.attn2.ln_k.weight"),
    **_linear("attn2.to_out.0", "x_block.attn2.proj"),
    **_linear("ff.net.0.proj", "x_block.mlp.fc1"),
    **_linear("ff.net.2", "x_block.mlp.fc2"),
    # text side
    **_linear("norm1_context.linear", "context_block.adaLN_modulation.1"),  # swapped in the last block
    **_linear("attn.add_q_proj", "context_block.attn.qkv", 0, 3),
    **_linear("attn.add_k_proj", "context_block.attn.qkv", 1, 3),
    **_linear("attn.add_v_proj", "context_block.attn.qkv", 2, 3),
    "attn.norm_added_q.weight": Slot("context_block.attn.ln_q.weight"),
    "attn.norm_added_k.weight": Slot("context_block.attn.ln_k.weight"),
    **_linear("attn.to_add_out", "context_block.attn.proj"),
    **_linear("ff_context.net.0.proj", "context_block.mlp.fc1"),
    **_linear("ff_context.net.2", "context_block.mlp.fc2"),
}
CONTEXT_MODULATION = "norm1_context.linear."
TOP_LEVEL = {
    "pos_embed.pos_embed": Slot("pos_embed"),
    **_linear("pos_embed.proj", "x_embedder.proj"),
    **_linear("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    **_linear("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    **_linear("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    **_linear("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    **_linear("context_embedder", "context_embedder"),
    **{key: slot._replace(swapped=True)
       for key, slot in _linear("norm_out.linear", "final_layer.adaLN_modulation.1").items()},
    **_linear("proj_out", "final_layer.linear"),
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
    hint = " (merge LoRA / adapter layers into the base weights first)" if re.search(
        r"lora_|base_layer|adapter", diffusers_key) else ""
    raise ValueError(f"the original SD3 layout has no name for the transformer parameter {diffusers_key!r}{hint}")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the output axis; its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


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

    parts_by_name: dict[str, list[tuple[str, torch.Tensor] | None]] = {}
    swapped: set[str] = set()
    for key, tensor in state.items():
        slot = original_slot(key, last_block)
        parts_by_name.setdefault(slot.original, [None] * slot.parts)[slot.part] = (key, tensor.detach())
        if slot.swapped:
            swapped.add(slot.original)

    original: dict[str, torch.Tensor] = {}
    for name, parts in parts_by_name.items():
        if None in parts:
            present = [p[0] for p in parts if p is not None]
            raise ValueError(f"{name} fuses {len(parts)} parameters, but the model has only {present}")
        tensors = [tensor for _, tensor in parts]
        if len({t.shape[1:] for t in tensors}) > 1:
            raise ValueError(f"{name}: cannot fuse {[(k, tuple(t.shape)) for k, t in parts]} (input widths differ)")
        tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        original[name] = swap_halves(tensor) if name in swapped else tensor
    return original


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
    tensors = {}
    for key, tensor in sd3_transformer_to_original(transformer).items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device (no weights to write); load the model's weights first")
        tensor = tensor.to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[CHECKPOINT_PREFIX + key] = tensor.contiguous()
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


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
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SD3 transformer file {path} does not exist")
    config, subfolder = _config_location(config_dir)
    try:
        config_dict = SD3Transformer2DModel.load_config(config, subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot read an SD3 transformer config from {config_dir} ({exc}). {CONFIG_HINT}") from exc
    try:
        with torch.device("meta"):
            skeleton = SD3Transformer2DModel.from_config(config_dict)
        expected = {key: tuple(t.shape) for key, t in sd3_transformer_to_original(skeleton).items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_dir} is not a usable SD3 transformer config ({exc}). {CONFIG_HINT}") from exc
    prefix, shapes, others = _original_shapes(path)
    _check_fits(path, config_dir, expected, shapes)

    if others:  # a full checkpoint: hand diffusers the transformer tensors only, not the VAE / text encoders
        with safe_open(str(path), framework="pt") as file:
            source: str | dict = {prefix + key: file.get_tensor(prefix + key) for key in shapes}
    else:
        source = str(path)
    try:
        return SD3Transformer2DModel.from_single_file(source, config=config, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"diffusers could not load {path} with the config in {config_dir}: {exc}") from exc


def _config_location(config_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(config, subfolder) for ``from_single_file``: a pipeline folder, a transformer folder, or a Hub repo id."""
    folder = Path(config_dir).expanduser()
    if (folder / "transformer" / "config.json").is_file():
        return str(folder), "transformer"
    if (folder / "config.json").is_file():
        return str(folder), None
    if folder.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(config_dir)):
        raise OSError(f"{config_dir} has neither transformer/config.json nor config.json. {CONFIG_HINT}")
    return str(config_dir), "transformer"  # a Hub repo id, resolved by diffusers (cache or download)


def _original_shapes(path: Path) -> tuple[str, dict[str, tuple[int, ...]], int]:
    """(key prefix, {transformer key without prefix: shape}, number of other keys) of a safetensors file, from its
    header."""
    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as exc:
        raise OSError(
            f"cannot read {path} as safetensors ({exc}): it is truncated, a git-lfs pointer or not a safetensors "
            "file. SD3 single files are loaded from .safetensors only."
        ) from exc
    prefix = CHECKPOINT_PREFIX if any(key.startswith(CHECKPOINT_PREFIX) for key in shapes) else ""
    ours = {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    return prefix, ours, len(shapes) - len(ours)


def _check_fits(path, config_dir, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """ValueError naming what differs when the file's keys or shapes are not those the config's model has."""
    if not any(key.startswith("joint_blocks.") for key in found):
        raise ValueError(f"{path} is not an original-layout SD3 transformer file (it has no joint_blocks.*)")
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k}: file {found[k]}, config {expected[k]}" for k in sorted(expected.keys() & found.keys())
             if found[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if _describe(found) != _describe(expected):
        problems.append(f"the file is {_describe(found)}; the config's model is {_describe(expected)}")
    for label, items in (("missing from the file", missing), ("not in the config's model", unexpected),
                         ("shapes differ", wrong)):
        if items:
            problems.append(f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
    raise ValueError(f"{path} does not fit the SD3 transformer config in {config_dir}: {'; '.join(problems)}. "
                     f"{CONFIG_HINT}")


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
