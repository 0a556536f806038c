"""One entry point for base models: ``builtin:NAME``, a hub id, a local diffusers folder or a single file.

Weights are read from safetensors only unless ``allow_pickle`` is set: a pickle (``.bin``, ``.ckpt``, ``.pt``,
``.pth``) can execute arbitrary code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..weights import HUB_ID, PICKLE_SUFFIXES, check_pipeline_dir, offline_error
from ..families import family_named, family_of_pipeline_class, family_of_single_file
from .components import Components
from .tiny import build_tiny, builtin_names, builtin_spec

SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Built-in names backed by trained weights shipped in the package (the others are seeded random tiny models).
_TOY_WEIGHTS = Path(__file__).resolve().parent.parent / "toyworld" / "weights"
PRETRAINED_BUILTINS = {"toy": _TOY_WEIGHTS / "toy-sd", "toy-flux": _TOY_WEIGHTS / "toy-flux"}
# name -> the pretrain stage that makes it
PRETRAIN_STAGES = {"toy": "generator", "toy-flux": "generator-flux"}


def load_components(cfg: ModelConfig | str, dtype: torch.dtype | None = None) -> Components:
    """Resolve ``cfg.pretrained`` and return the model's components on the CPU in ``dtype`` (default float32:
    transformers would otherwise keep each text encoder in whatever dtype its file holds)."""
    if isinstance(cfg, str):
        cfg = ModelConfig(pretrained=cfg)
    dtype = dtype or torch.float32
    src = cfg.pretrained.strip()
    if src.startswith("builtin:") and src[len("builtin:"):] in PRETRAINED_BUILTINS:
        comps = _from_shipped(src[len("builtin:"):], cfg, dtype)
    elif src.startswith("builtin:"):
        comps = build_tiny(src[len("builtin:"):])
    elif Path(src).expanduser().is_dir():
        comps = _from_pipeline(str(Path(src).expanduser()), cfg, dtype, local=True)
    elif src.lower().endswith(SINGLE_FILE_SUFFIXES):
        comps = _from_single_file(Path(src).expanduser(), cfg, dtype)
    elif HUB_ID.match(src):
        comps = _from_pipeline(src, cfg, dtype, local=False)
    else:
        raise ModelLoadError(
            f"model.pretrained = {src!r} is not a folder, a .safetensors file, a hub id (org/name) or a built-in "
            "name (builtin:toy, " + ", ".join(f"builtin:{n}" for n in builtin_names()) + ").")
    if cfg.family != "auto" and comps.family.name != cfg.family:
        raise ModelLoadError(f"model.family is {cfg.family!r} but {src} is an {comps.family.name!r} model; set "
                             "model.family: auto")
    for module in (comps.denoiser, comps.vae, *comps.text_encoders):
        if next(module.parameters()).dtype != dtype:
            module.to(dtype)
        # Inference mode until a trainer says otherwise: built-in models are constructed in training mode, and
        # any dropout left on makes the same seed give different images.
        module.eval()
    return comps


def peek_family(pretrained: str) -> str | None:
    """The family name of a base model from its configs alone (no weights loaded); None when that cannot be told
    offline (e.g. a hub id not in the local cache, a single file)."""
    src = pretrained.strip()
    try:
        if src.startswith("builtin:"):
            name = src[len("builtin:"):]
            if name in PRETRAINED_BUILTINS:
                src = str(PRETRAINED_BUILTINS[name])
            else:
                return family_named(builtin_spec(name)["family"]).name
        if (Path(src).expanduser() / "model_index.json").is_file():  # a folder, or a shipped built-in's
            index = json.loads((Path(src).expanduser() / "model_index.json").read_text())
        elif HUB_ID.match(src):
            index = DiffusionPipeline.load_config(src)
        else:
            return None
        return family_of_pipeline_class(index["_class_name"]).name
    except (ModelLoadError, OSError, ValueError, KeyError):
        return None


def _from_shipped(name: str, cfg: ModelConfig, dtype) -> Components:
    """A pretrained model that ships inside the package (a plain diffusers folder)."""
    folder = PRETRAINED_BUILTINS[name]
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"builtin:{name} has no weights at {folder}; the package was installed without them. "
                             f"Recreate them with `python -m t2i_personal.toyworld.pretrain {PRETRAIN_STAGES[name]}`.")
    comps = _from_pipeline(str(folder), cfg, dtype, local=True)
    comps.source = f"builtin:{name}"
    return comps


def _from_pipeline(src: str, cfg: ModelConfig, dtype, local: bool) -> Components:
    if local:
        index = Path(src) / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{src} is a folder but not a diffusers pipeline (no model_index.json). Point "
                                 "model.pretrained at the folder that contains model_index.json, unet/, vae/, ...")
        check_pipeline_dir(Path(src), cfg.allow_pickle, "set model.allow_pickle: true")
        class_name = json.loads(index.read_text())["_class_name"]
    else:
        class_name = None
    kwargs = dict(revision=cfg.revision, variant=cfg.variant, torch_dtype=dtype,
                  use_safetensors=None if cfg.allow_pickle else True)
    try:
        if class_name is None:
            class_name = DiffusionPipeline.load_config(src, revision=cfg.revision)["_class_name"]
        family = family_of_pipeline_class(class_name)
        pipe = family.pipeline_class.from_pretrained(src, **kwargs, **family.pipeline_kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        if local:
            raise ModelLoadError(f"could not load the diffusers folder {src}: {exc}") from exc
        raise offline_error("model", src, exc, _download_hint(src)) from exc
    return family.components_from_pipeline(pipe, src)


def _single_file_family(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return family_of_single_file(set(f.keys()))
    except (SafetensorError, OSError) as exc:
        head = path.read_bytes()[:64]
        hint = (" It is a git-lfs pointer, not the weights: run `git lfs pull` where you downloaded it."
                if head.startswith(b"version https://git-lfs") else " The file is truncated or not a safetensors file.")
        raise ModelLoadError(f"cannot read {path} as safetensors ({exc}).{hint}") from exc


def _from_single_file(path: Path, cfg: ModelConfig, dtype) -> Components:
    if not path.is_file():
        raise ModelLoadError(f"model.pretrained file {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES and not cfg.allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickle checkpoint ({path.suffix}), which can run arbitrary code when loaded. Convert it to "
            ".safetensors, or set model.allow_pickle: true if you trust this file.")
    if cfg.family != "auto":
        family = family_named(cfg.family)
    else:
        family = _single_file_family(path) if path.suffix.lower() == ".safetensors" else family_of_single_file(None)
    if hasattr(family, "from_single_file"):  # a transformer-only file (FLUX): the rest comes from config_dir
        return family.components_from_pipeline(family.from_single_file(path, cfg, dtype), str(path))
    kwargs: dict = dict(torch_dtype=dtype, **family.pipeline_kwargs)
    if cfg.config_dir:
        kwargs["config"] = cfg.config_dir
    try:
        pipe = family.pipeline_class.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        hint = ("" if cfg.config_dir else
                " Single-file checkpoints need the architecture's configs: set model.config_dir to a local diffusers "
                "folder of the same architecture (e.g. a downloaded stable-diffusion-v1-5 without its weights).")
        raise ModelLoadError(f"could not load single-file checkpoint {path}: {exc}.{hint}") from exc
    return family.components_from_pipeline(pipe, str(path))


def _download_hint(model_id: str) -> str:
    name = model_id.split("/")[-1]
    local = f"There is no local folder {Path(model_id).resolve()} either. " if "/" in model_id else ""
    return (f"{local}On a machine with internet: `huggingface-cli download {model_id} --local-dir /path/to/{name}` "
            f"(safetensors files only are needed), copy the folder here and set model.pretrained: /path/to/{name}.")
