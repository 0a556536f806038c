"""What the original-layout transformer single files (:mod:`.flux_single_file`, :mod:`.sd3_single_file`) share.

The family modules hold their name tables (diffusers key -> :class:`Slot`), the layout's quirks and a
:class:`OriginalLayout` that names the family in messages; this module holds the logic that is the same for both:

* :func:`linear` / :class:`Slot`: table entries, with fused parts and swapped (scale, shift) halves;
* :func:`fuse_to_original`: a diffusers state dict under the original keys, fused parts concatenated on the output
  axis, swapped halves swapped; :func:`unnamed_parameter` is the error for a parameter a layout has no name for;
* :func:`save_original_file`: an atomic safetensors write with a dtype cast and string metadata;
* :meth:`OriginalLayout.load`: the loader's checks before diffusers' ``from_single_file`` (the file exists and is
  safetensors, not a git-lfs pointer; ``config_dir`` is a pipeline folder, a transformer folder or a Hub repo id;
  the keys and shapes of the file are those of the config's model, built on the meta device) with errors that name
  the file, the config and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path

# The prefix full ComfyUI / A1111 checkpoints (and Stability's SD3 single files) put before the transformer's keys.
CHECKPOINT_PREFIX = "model.diffusion_model."


class Slot(NamedTuple):
    """Where a diffusers parameter goes in the original layout: ``original`` key, for a fused weight which ``part``
    of how many ``parts`` (stacked on the output axis, in part order), and whether its two output halves are swapped
    ((scale, shift) <-> (shift, scale))."""

    original: str
    part: int = 0
    parts: int = 1
    swapped: bool = False


def linear(diffusers: str, original: str, part: int = 0, parts: int = 1, swapped: bool = False) -> dict[str, Slot]:
    """Table entries for a linear layer: its ``.weight`` and ``.bias`` under the same names on both sides."""
    return {f"{diffusers}.{p}": Slot(f"{original}.{p}", part, parts, swapped) for p in ("weight", "bias")}


def unnamed_parameter(layout: str, diffusers_key: str) -> ValueError:
    """The error for a parameter the original ``layout`` (e.g. ``"FLUX"``) has no name for."""
    hint = " (merge LoRA / adapter layers into the base weights first)" if re.search(
        r"lora_|base_layer|adapter", diffusers_key) else ""
    return ValueError(f"the original {layout} layout has no name for the transformer parameter {diffusers_key!r}{hint}")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the output axis; its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def fuse_to_original(state: Mapping[str, torch.Tensor], slot_of: Callable[[str], Slot]) -> dict[str, torch.Tensor]:
    """``state`` (a diffusers state dict) under the original keys ``slot_of`` gives: fused parts concatenated on the
    output axis in part order, swapped slots with their halves swapped. Unfused tensors are detached views; fused
    and swapped ones are new tensors. ValueError if a fused weight lacks a part or its parts' input widths differ."""
    parts_by_name: dict[str, list[tuple[str, torch.Tensor] | None]] = {}
    swapped: set[str] = set()
    for key, tensor in state.items():
        slot = slot_of(key)
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


def save_original_file(
    original: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
    prefix: str = "",
) -> Path:
    """Write ``original`` to ``path`` as safetensors, every key prefixed with ``prefix``, atomically (a temp file in
    the same folder, then ``os.replace``). ``dtype`` casts floating tensors; ``metadata`` values are stored as
    strings in the header. ValueError (and nothing written) for a tensor on the meta device. Returns the path."""
    tensors = {}
    for key, tensor in original.items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device (no weights to write); load the model's weights first")
        tensor = tensor.to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[prefix + key] = tensor.contiguous()
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


class Header(NamedTuple):
    """What a safetensors file's header says: the transformer keys' ``prefix`` (``model.diffusion_model.`` or
    none), their ``shapes`` (keys without the prefix), and how many ``others`` (e.g. a full checkpoint's VAE and
    text encoders) it holds besides."""

    prefix: str
    shapes: dict[str, tuple[int, ...]]
    others: int


Shapes = Mapping[str, tuple]


@dataclass(frozen=True)
class OriginalLayout:
    """One family's original layout, as the shared loader needs it.

    ``name`` / ``article`` / ``file_kind`` are how messages name it ("FLUX transformer file", "a FLUX transformer
    config", "an original-layout FLUX.1 transformer file"); ``blocks`` is the key prefix every file of the layout
    has (``double_blocks`` / ``joint_blocks``); ``to_original`` is the family's diffusers -> original converter,
    run on a meta-device ``model_class`` for the expected keys and shapes; ``describe`` sums up a key set (width,
    blocks, variant) and ``contrast`` (``{file}``, ``{config}``) sets the file's summary against the config's;
    ``config_errors`` are the exceptions building that model that mean the config is unusable (a ValueError with
    the hint), ``config_hint`` says what ``config_dir`` must be.
    """

    name: str
    article: str
    file_kind: str
    blocks: str
    model_class: Any
    to_original: Callable[[Any], dict[str, torch.Tensor]]
    describe: Callable[[Shapes], str]
    contrast: str
    config_hint: str
    config_errors: tuple[type[Exception], ...] = ()

    def load(
        self,
        path: str | os.PathLike,
        config_dir: str | os.PathLike,
        dtype: torch.dtype | None,
        source: Callable[[Path, Header, torch.nn.Module], str | dict],
    ):
        """``model_class.from_single_file(source(path, header, skeleton), ...)`` with the config in ``config_dir``,
        once the file has been checked against that config (see the module docstring). ``source`` gives what
        diffusers reads: the path, or a state dict."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{self.name} transformer file {path} does not exist")
        config, subfolder = self.config_location(config_dir)
        try:
            config_dict = self.model_class.load_config(config, subfolder=subfolder)
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot read {self.article} {self.name} transformer config from {config_dir} ({exc}). "
                          f"{self.config_hint}") from exc
        try:
            with torch.device("meta"):
                skeleton = self.model_class.from_config(config_dict)
            expected = {key: tuple(t.shape) for key, t in self.to_original(skeleton).items()}
        except self.config_errors as exc:
            raise ValueError(f"{config_dir} is not a usable {self.name} transformer config ({exc}). "
                             f"{self.config_hint}") from exc
        header = self.read_header(path)
        self.check_fits(path, config_dir, expected, header.shapes)
        try:
            return self.model_class.from_single_file(source(path, header, skeleton), config=config,
                                                     subfolder=subfolder, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"diffusers could not load {path} with the config in {config_dir}: {exc}") from exc

    def config_location(self, config_dir: str | os.PathLike) -> tuple[str, str | None]:
        """(config, subfolder) for ``from_single_file``: a pipeline folder, a transformer folder, or a Hub repo id."""
        folder = Path(config_dir).expanduser()
        if (folder / "transformer" / "config.json").is_file():
            return str(folder), "transformer"
        if (folder / "config.json").is_file():
            return str(folder), None
        if folder.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(config_dir)):
            raise OSError(f"{config_dir} has neither transformer/config.json nor config.json. {self.config_hint}")
        return str(config_dir), "transformer"  # a Hub repo id, resolved by diffusers (cache or download)

    def read_header(self, path: Path) -> Header:
        """The :class:`Header` of a safetensors file; OSError for one that is not (truncated, a git-lfs pointer)."""
        try:
            with safe_open(str(path), framework="pt") as file:
                shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
        except (SafetensorError, OSError) as exc:
            raise OSError(
                f"cannot read {path} as safetensors ({exc}): it is truncated, a git-lfs pointer or not a safetensors "
                f"file. {self.name} single files are loaded from .safetensors only."
            ) from exc
        prefix = CHECKPOINT_PREFIX if any(key.startswith(CHECKPOINT_PREFIX) for key in shapes) else ""
        ours = {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
        return Header(prefix, ours, len(shapes) - len(ours))

    def check_fits(self, path, config_dir, expected: Shapes, found: Shapes) -> None:
        """ValueError naming what differs when the file's keys or shapes are not those the config's model has."""
        if not any(key.startswith(f"{self.blocks}.") for key in found):
            raise ValueError(f"{path} is not an original-layout {self.file_kind} transformer file "
                             f"(it has no {self.blocks}.*)")
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        wrong = [f"{k}: file {found[k]}, config {expected[k]}" for k in sorted(expected.keys() & found.keys())
                 if found[k] != expected[k]]
        if not (missing or unexpected or wrong):
            return
        problems = []
        if (file := self.describe(found)) != (config := self.describe(expected)):
            problems.append(self.contrast.format(file=file, config=config))
        for label, items in (("missing from the file", missing), ("not in the config's model", unexpected),
                             ("shapes differ", wrong)):
            if items:
                problems.append(f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
        raise ValueError(f"{path} does not fit the {self.name} transformer config in {config_dir}: "
                         f"{'; '.join(problems)}. {self.config_hint}")

