"""One loader for the models that evaluation metrics run: CLIP (open_clip) and DINO-style ViTs (transformers).

Sources :func:`load_metric_model` understands:

* ``builtin:toy-clip``: the toy world's trained evaluation CLIP, shipped in the package (64 px, CPU friendly);
* a local open_clip folder holding ``open_clip_config.json`` and ``open_clip_model.safetensors`` (the layout the
  hub uses and :func:`t2i_personal.toyworld.clip.save` writes);
* an open_clip model name plus a pretrained tag, e.g. ``load_metric_model("ViT-B-32", pretrained="openai")``, or
  ``"ViT-B-32"`` with ``pretrained`` a local ``.safetensors`` file;
* ``hf-hub:org/name``: an open_clip model on the Hugging Face hub;
* a local transformers folder (``config.json`` + ``model.safetensors``, optionally ``preprocessor_config.json``)
  or a hub id such as ``facebook/dino-vits16``: loaded with ``AutoModel`` and ``AutoImageProcessor``.

Weights are read from safetensors only unless ``allow_pickle=True``: a pickle (``.bin``, ``.pt``, ``.pth``, ...)
can execute arbitrary code when loaded. A hub model that is neither reachable nor cached gives a
:class:`~t2i_personal.errors.ModelLoadError` that names it and says how to provide it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from ..weights import HUB_ID, PICKLE_SUFFIXES, check_weights_dir, is_pickle, offline_error

BUILTIN_PREFIX = "builtin:"
BUILTIN_CLIPS = ("toy-clip",)
OPEN_CLIP_CONFIG = "open_clip_config.json"
TRANSFORMERS_CONFIG = "config.json"


@dataclass
class MetricModel:
    """A loaded metric model, in eval mode and float32, with what is needed to feed it and to name it.

    ``library``: ``"open_clip"`` or ``"transformers"``. ``preprocess``: open_clip's eval transform (PIL image ->
    tensor) or the transformers image processor (``None`` if the folder has none). ``tokenizer``: open_clip's
    tokenizer (``None`` for transformers vision models). ``backbone`` / ``pretrained``: the names a result records.
    """

    library: str
    model: Any
    preprocess: Any
    tokenizer: Any
    source: str
    backbone: str
    pretrained: str | None
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"library": self.library, "backbone": self.backbone, "pretrained": self.pretrained,
                "source": self.source, **self.extra}


def load_metric_model(source: str | os.PathLike, *, pretrained: str | None = None, library: str = "auto",
                      device: str | torch.device = "cpu", allow_pickle: bool = False) -> MetricModel:
    """Resolve ``source`` (see the module docstring) and load it on ``device``, float32, eval mode.

    ``library`` (``"auto"``, ``"open_clip"`` or ``"transformers"``) forces how a source is read when the automatic
    choice is wrong (e.g. a hub id that is an open_clip repository: prefer ``hf-hub:org/name`` there).
    """
    if library not in ("auto", "open_clip", "transformers"):
        raise ModelLoadError(f"library must be 'auto', 'open_clip' or 'transformers', not {library!r}")
    src = str(source).strip()
    path = Path(src).expanduser()
    if src.startswith(BUILTIN_PREFIX):
        return _load_builtin(src[len(BUILTIN_PREFIX):], device)
    if path.is_dir():
        is_open_clip = (path / OPEN_CLIP_CONFIG).is_file()
        if library == "open_clip" or (library == "auto" and is_open_clip):
            return _load_open_clip_dir(path, src, device, allow_pickle)
        if library == "transformers" or (path / TRANSFORMERS_CONFIG).is_file():
            return _load_transformers(str(path), src, device, allow_pickle, local=True)
        raise ModelLoadError(
            f"{path} is a folder but holds neither {OPEN_CLIP_CONFIG} (an open_clip model) nor {TRANSFORMERS_CONFIG} "
            "(a transformers model). Point the metric at the folder that contains the model's config and weights.")
    if library == "open_clip" or (library == "auto" and _looks_open_clip(src, pretrained)):
        return _load_open_clip_named(src, pretrained, device, allow_pickle)
    if library == "transformers" or HUB_ID.match(src):
        return _load_transformers(src, src, device, allow_pickle, local=False)
    raise ModelLoadError(
        f"metric model {src!r} is not a folder, a hub id (org/name), an open_clip model name (e.g. 'ViT-B-32' with "
        f"pretrained='openai'), 'hf-hub:org/name' or a built-in name ({', '.join(BUILTIN_PREFIX + b for b in BUILTIN_CLIPS)}).")


# ------------------------------------------------------------------------------------------------------- open_clip


def _looks_open_clip(src: str, pretrained: str | None) -> bool:
    import open_clip

    return src.startswith("hf-hub:") or pretrained is not None or src in open_clip.list_models()


def _load_builtin(name: str, device) -> MetricModel:
    from ..toyworld import clip as toy_clip

    if name not in BUILTIN_CLIPS:
        raise ModelLoadError(f"unknown built-in metric model {BUILTIN_PREFIX}{name}; available: "
                             f"{', '.join(BUILTIN_PREFIX + b for b in BUILTIN_CLIPS)}")
    try:
        model, preprocess, tokenizer = toy_clip.load_toy_clip(device=str(device))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{BUILTIN_PREFIX}{name}: {exc} (the package was installed without its weights)") from exc
    return MetricModel("open_clip", model, preprocess, tokenizer, source=f"{BUILTIN_PREFIX}{name}",
                       backbone=toy_clip.MODEL_NAME, pretrained=f"{BUILTIN_PREFIX}{name}",
                       extra={"embed_dim": _embed_dim(model), "image_size": _image_size(model)})


def _load_open_clip_dir(path: Path, src: str, device, allow_pickle: bool) -> MetricModel:
    import open_clip

    from ..toyworld.clip import register_config

    if not (path / OPEN_CLIP_CONFIG).is_file():
        raise ModelLoadError(f"{path} is not an open_clip folder: {OPEN_CLIP_CONFIG} is missing")
    check_weights_dir(path, allow_pickle, "open_clip_model.safetensors")
    register_config()  # the toy CLIP's name, in case a config refers to it
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{path}", device=device, weights_only=not allow_pickle)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"could not load the open_clip folder {path}: {type(exc).__name__}: {exc}") from exc
    model = model.float().eval()
    return MetricModel("open_clip", model, preprocess, tokenizer, source=src, backbone=path.resolve().name,
                       pretrained=str(path.resolve()),
                       extra={"embed_dim": _embed_dim(model), "image_size": _image_size(model)})


def _load_open_clip_named(name: str, pretrained: str | None, device, allow_pickle: bool) -> MetricModel:
    import open_clip

    from ..toyworld.clip import register_config

    register_config()
    if pretrained is None and not name.startswith("hf-hub:"):
        raise ModelLoadError(
            f"open_clip model {name!r} needs pretrained weights: pass pretrained=<tag> (one of "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'}) or a local .safetensors file")
    if pretrained is not None and is_pickle(pretrained) and not allow_pickle:
        raise ModelLoadError(
            f"{pretrained} is a pickle checkpoint, which can run arbitrary code when loaded. Convert it to "
            ".safetensors, or pass allow_pickle=True if you trust this file.")
    is_file = pretrained is not None and ("/" in pretrained or os.sep in pretrained
                                          or pretrained.lower().endswith((".safetensors", *PICKLE_SUFFIXES)))
    if pretrained is not None and not is_file and name in open_clip.list_models() \
            and pretrained.lower() not in [t.lower() for t in open_clip.list_pretrained_tags_by_model(name)]:
        raise ModelLoadError(
            f"open_clip has no pretrained tag {pretrained!r} for model {name!r}; known tags: "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'} (or pass a local .safetensors file)")
    if pretrained is not None and ("/" in pretrained or pretrained.endswith(".safetensors")) \
            and not Path(pretrained).expanduser().is_file():
        raise ModelLoadError(f"open_clip weights file {pretrained} (for model {name!r}) does not exist")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=not allow_pickle)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # hub/offline errors come as OSError, RuntimeError, ValueError and hub-specific types
        if name.startswith("hf-hub:"):  # a hub repository: the hub's download recipe applies
            raise offline_error("metric model", name.removeprefix("hf-hub:"), exc) from exc
        raise offline_error("metric model", f"{name} (pretrained={pretrained})", exc,
                            _open_clip_download_hint(name, pretrained)) from exc
    model = model.float().eval()
    return MetricModel("open_clip", model, preprocess, tokenizer, source=name,
                       backbone=name, pretrained=pretrained if pretrained is not None else "hf-hub",
                       extra={"embed_dim": _embed_dim(model), "image_size": _image_size(model)})


def _embed_dim(model) -> int | None:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    return getattr(getattr(model, "visual", None), "output_dim", None)


def _image_size(model):
    size = getattr(getattr(model, "visual", None), "image_size", None)
    return list(size) if isinstance(size, (tuple, list)) else size


# ---------------------------------------------------------------------------------------------------- transformers


def _load_transformers(location: str, src: str, device, allow_pickle: bool, local: bool) -> MetricModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    if local:
        check_weights_dir(Path(location), allow_pickle, "model.safetensors")
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=local)
        # ViTModel adds a pooler that DINO checkpoints lack (it would be random, and reported as missing); the
        # metrics read the [CLS] token of last_hidden_state, never the pooler.
        extra_kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        model = AutoModel.from_pretrained(location, config=config, use_safetensors=None if allow_pickle else True,
                                          local_files_only=local, **extra_kwargs)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"could not load the transformers folder {location}: {exc}") from exc
        raise offline_error("metric model", location, exc) from exc
    try:
        processor = AutoImageProcessor.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError):
        processor = None  # the metrics can preprocess on their own (e.g. DINO's 256 -> 224 protocol)
    model = model.to(device=device, dtype=torch.float32).eval()
    name = str(Path(location).resolve().name) if local else location
    config = model.config
    extra = {"architecture": type(model).__name__, "hidden_size": getattr(config, "hidden_size", None)}
    return MetricModel("transformers", model, processor, None, source=src, backbone=name,
                       pretrained=str(Path(location).resolve()) if local else location, extra=extra)


# ---------------------------------------------------------------------------------------------------------- errors


def _open_clip_download_hint(name: str, tag: str | None) -> str:
    """An open_clip model name with a pretrained tag is no hub repository: how to bring its weights here."""
    return (f"On a machine with internet, run once `python -c \"import open_clip; open_clip.create_model_and_transforms("
            f"'{name}', pretrained='{tag}')\"` and copy the Hugging Face cache (~/.cache/huggingface) here, "
            f"or save the model as a folder with open_clip_config.json + open_clip_model.safetensors and pass that "
            f"folder's path (or pass pretrained=/path/to/weights.safetensors).")
