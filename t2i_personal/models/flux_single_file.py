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
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import FluxTransformer2DModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from .ldm_keys import unwrap

__all__ = [
    "flux_transformer_to_original",
    "save_flux_transformer_single_file",
    "load_flux_transformer_single_file",
    "original_slot",
]

# The prefix full ComfyUI / A1111 checkpoints put before the transformer's keys; transformer-only files have none.
CHECKPOINT_PREFIX = "model.diffusion_model."
# The model width diffusers' converter assumes when it splits single_blocks.{i}.linear1 (FLUX.1's).
DIFFUSERS_CONVERTER_WIDTH = 3072
FINAL_MODULATION = "final_layer.adaLN_modulation.1."
CONFIG_HINT = (
    "Set model.config_dir to a local diffusers folder of the same FLUX variant as the file (FLUX.1-dev vs "
    "FLUX.1-schnell, same width and block counts): model_index.json plus transformer/config.json, no weights needed."
)


class Slot(NamedTuple):
    """Where a diffusers parameter goes in the original layout: ``original`` key, and for a fused weight which
    ``part`` of how many ``parts`` (stacked on the output axis, in part order)."""

    original: str
    part: int = 0
    parts: int = 1


def _linear(diffusers: str, original: str, part: int = 0, parts: int = 1) -> dict[str, Slot]:
    return {f"{diffusers}.{p}": Slot(f"{original}.{p}", part, parts) for p in ("weight", "bias")}


# Inside transformer_blocks.{i} -> double_blocks.{i}.
DOUBLE_BLOCK = {
    **_linear("norm1.linear", "img_mod.lin"),
    **_linear("attn.to_q", "img_attn.qkv", 0, 3),
    **_linear("attn.to_k", "img_attn.qkv", 1, 3),
    **_linear("attn.to_v", "img_attn.qkv", 2, 3),
    "attn.norm_q.weight": Slot("img_attn.norm.query_norm.scale"),
    "attn.norm_k.weight": Slot("img_attn.norm.key_norm.scale"),
    **_linear("attn.to_out.0", "img_attn.proj"),
    **_linear("ff.net.0.proj", "img_mlp.0"),
    **_linear("ff.net.2", "img_mlp.2"),
    **_linear("norm1_context.linear", "txt_mod.lin"),
    **_linear("attn.add_q_proj", "txt_attn.qkv", 0, 3),
    **_linear("attn.add_k_proj", "txt_attn.qkv", 1, 3),
    **_linear("attn.add_v_proj", "txt_attn.qkv", 2, 3),
    "attn.norm_added_q.weight": Slot("txt_attn.norm.query_norm.scale"),
    "attn.norm_added_k.weight": Slot("txt_attn.norm.key_norm.scale"),
    **_linear("attn.to_add_out", "txt_attn.proj"),
    **_linear("ff_context.net.0.proj", "txt_mlp.0"),
    **_linear("ff_context.net.2", "txt_mlp.2"),
}
# Inside single_transformer_blocks.{i} -> single_blocks.{i}.
SINGLE_BLOCK = {
    **_linear("norm.linear", "modulation.lin"),
    **_linear("attn.to_q", "linear1", 0, 4),
    **_linear("attn.to_k", "linear1", 1, 4),
    **_linear("attn.to_v", "linear1", 2, 4),
    **_linear("proj_mlp", "linear1", 3, 4),
    "attn.norm_q.weight": Slot("norm.query_norm.scale"),
    "attn.norm_k.weight": Slot("norm.key_norm.scale"),
    **_linear("proj_out", "linear2"),
}
TOP_LEVEL = {
    **_linear("x_embedder", "img_in"),
    **_linear("context_embedder", "txt_in"),
    **_linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    **_linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    **_linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    **_linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    **_linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    **_linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    **_linear("norm_out.linear", "final_layer.adaLN_modulation.1"),  # halves swapped, see swap_halves
    **_linear("proj_out", "final_layer.linear"),
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
    hint = " (merge LoRA / adapter layers into the base weights first)" if re.search(
        r"lora_|base_layer|adapter", diffusers_key) else ""
    raise ValueError(f"the original FLUX layout has no name for the transformer parameter {diffusers_key!r}{hint}")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the output axis; its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def flux_transformer_to_original(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel``'s weights under the original BFL keys (see the module docstring).

    Unfused tensors are detached views of the parameters (clone before changing them); fused and swapped ones
    are new tensors. Works on the meta device too (keys and shapes without weights).
    """
    parts_by_name: dict[str, list[tuple[str, torch.Tensor] | None]] = {}
    for key, tensor in unwrap(transformer).state_dict().items():
        slot = original_slot(key)
        parts_by_name.setdefault(slot.original, [None] * slot.parts)[slot.part] = (key, tensor.detach())

    original: dict[str, torch.Tensor] = {}
    for name, parts in parts_by_name.items():
        if None in parts:
            present = [p[0] for p in parts if p is not None]
            raise ValueError(f"{name} fuses {len(parts)} parameters, but the model has only {present}")
        tensors = [tensor for _, tensor in parts]
        if len({t.shape[1:] for t in tensors}) > 1:
            raise ValueError(f"{name}: cannot fuse {[(k, tuple(t.shape)) for k, t in parts]} (input widths differ)")
        tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        original[name] = swap_halves(tensor) if name.startswith(FINAL_MODULATION) else tensor
    return original


def save_flux_transformer_single_file(
    transformer: FluxTransformer2DModel,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write :func:`flux_transformer_to_original` to ``path`` as safetensors, atomically (a temp file in the same
    folder, then ``os.replace``). ``dtype`` casts floating tensors (``torch.bfloat16`` is what BFL ships);
    ``metadata`` values are stored as strings in the header. Returns the path."""
    tensors = {}
    for key, tensor in flux_transformer_to_original(transformer).items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device (no weights to write); load the model's weights first")
        tensor = tensor.to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


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
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FLUX transformer file {path} does not exist")
    config, subfolder = _config_location(config_dir)
    try:
        config_dict = FluxTransformer2DModel.load_config(config, subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot read a FLUX transformer config from {config_dir} ({exc}). {CONFIG_HINT}") from exc
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel.from_config(config_dict)
    expected = {key: tuple(t.shape) for key, t in flux_transformer_to_original(skeleton).items()}
    prefix, shapes = _original_shapes(path)
    _check_fits(path, config_dir, expected, shapes)

    if shapes["img_in.weight"][0] == DIFFUSERS_CONVERTER_WIDTH:
        source: str | dict = str(path)  # diffusers' own converter
    else:
        source = _original_to_diffusers(load_file(str(path)), prefix, skeleton)
    try:
        return FluxTransformer2DModel.from_single_file(source, config=config, subfolder=subfolder, torch_dtype=dtype)
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


def _original_shapes(path: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(key prefix, {key without prefix: shape}) of the transformer tensors in a safetensors file, from its header."""
    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as exc:
        raise OSError(
            f"cannot read {path} as safetensors ({exc}): it is truncated, a git-lfs pointer or not a safetensors "
            "file. FLUX single files are loaded from .safetensors only."
        ) from exc
    prefix = CHECKPOINT_PREFIX if any(key.startswith(CHECKPOINT_PREFIX) for key in shapes) else ""
    return prefix, {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}


def _check_fits(path, config_dir, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """ValueError naming what differs when the file's keys or shapes are not those the config's model has."""
    if not any(key.startswith("double_blocks.") for key in found):
        raise ValueError(f"{path} is not an original-layout FLUX.1 transformer file (it has no double_blocks.*)")
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k}: file {found[k]}, config {expected[k]}" for k in sorted(expected.keys() & found.keys())
             if found[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if _describe(found) != _describe(expected):
        problems.append(f"the file is {_describe(found)}, the config's model {_describe(expected)}")
    for label, items in (("missing from the file", missing), ("not in the config's model", unexpected),
                         ("shapes differ", wrong)):
        if items:
            problems.append(f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
    raise ValueError(f"{path} does not fit the FLUX transformer config in {config_dir}: {'; '.join(problems)}. "
                     f"{CONFIG_HINT}")


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
    """The inverse of :func:`flux_transformer_to_original` for a file already checked by :func:`_check_fits`:
    fused tensors are cut into the skeleton's parameter sizes, in part order."""
    sizes = {key: t.shape[0] for key, t in skeleton.state_dict().items()}
    slots = sorted(((original_slot(key), key) for key in sizes), key=lambda item: item[0].part)
    next_row: dict[str, int] = {}
    diffusers = {}
    for slot, key in slots:
        tensor = original[prefix + slot.original]
        if slot.original.startswith(FINAL_MODULATION):
            tensor = swap_halves(tensor)
        if slot.parts > 1:
            start = next_row.get(slot.original, 0)
            tensor = tensor[start:start + sizes[key]]
            next_row[slot.original] = start + sizes[key]
        diffusers[key] = tensor
    return diffusers
