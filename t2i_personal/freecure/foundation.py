"""FreeCure's foundation: the un-personalized model that draws the attributes the personalized one drops.

Either the personalized pipeline itself with its personalization switched off for a pass (LoRA disabled, Custom
Diffusion processors set aside: what the method says they are, see
:func:`t2i_personal.methods.custom_diffusion.foundation_processors`), or a separate pipeline: the recorded base
model of a full fine-tune, or one the caller names.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import ConfigError

# The inference and methods packages load diffusers: imported where used, so that importing FreeCure (its command
# line's --help, the evaluator) stays quick.


def denoiser_of(pipe):
    """The pipeline's denoiser: its UNet, or (FLUX, SD3) its transformer; ``None`` when it has neither."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)


def _custom_diffusion(pipe) -> dict:
    """Stock processors for the UNet's Custom Diffusion ones (a transformer's joint attention carries none)."""
    from ..methods.custom_diffusion import foundation_processors

    unet = getattr(pipe, "unet", None)
    return foundation_processors(unet) if unet is not None else {}


def _lora_adapters(pipe) -> bool:
    try:
        return any(pipe.get_list_adapters().values())
    except (AttributeError, ValueError):
        return False


def _foundation_scheduler(pipe):
    """The personalized pipeline's sampler with the base model's own parameterisation: an adapter trained with
    another ``prediction_type`` than its base must not impose it on the base."""
    from ..inference.pipeline import personalization_record

    base_type = (personalization_record(pipe) or {}).get("base_prediction_type")
    overrides = {"prediction_type": base_type} if base_type else {}
    return type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)


class SharedFoundation:
    """The personalized pipeline itself with its personalization switched off for the duration of a ``with``."""

    def __init__(self, pipe):
        self.pipe = pipe

    @contextmanager
    def active(self):
        pipe = self.pipe
        lora = _lora_adapters(pipe)
        denoiser = denoiser_of(pipe)
        stock = _custom_diffusion(pipe)
        original = dict(denoiser.attn_processors) if stock else {}
        scheduler = pipe.scheduler
        pipe.scheduler = _foundation_scheduler(pipe)
        if lora:
            pipe.disable_lora()
        if stock:
            denoiser.set_attn_processor({**original, **stock})
        try:
            yield pipe
        finally:
            if stock:
                denoiser.set_attn_processor(original)
            if lora:
                pipe.enable_lora()
            pipe.scheduler = scheduler


class SeparateFoundation:
    """Another pipeline of the same architecture, already un-personalized."""

    def __init__(self, pipe):
        self.pipe = pipe

    @contextmanager
    def active(self):
        yield self.pipe


def build_foundation(pipe, foundation=None, allow_pickle: bool = False) -> SharedFoundation | SeparateFoundation:
    """``foundation``: ``None`` (the pipeline itself with its adapters off or, for a full fine-tune loaded by
    ``load_personalized``, its recorded base model), a pipeline, or a base-model source (``builtin:...``, hub id,
    folder, file)."""
    from ..inference.pipeline import base_model_config, personalization_record

    if foundation is None:
        record = personalization_record(pipe)
        personalized_weights = record is not None and record["artifact"]["type"] == "pipeline"
        adapters = _lora_adapters(pipe) or bool(_custom_diffusion(pipe))
        if adapters or (record is not None and not personalized_weights):
            return SharedFoundation(pipe)
        if not personalized_weights:
            raise ConfigError("FreeCure cannot tell what the foundation of this pipeline is: it carries no LoRA or "
                              "Custom Diffusion adapter to switch off and was not loaded with load_personalized. "
                              "Pass foundation=<the base pipeline> or foundation='<base model id or folder>'.")
        foundation = base_model_config(record).model_dump()
    from ..families import family_of_denoiser

    if isinstance(foundation, (str, dict)):
        foundation = _load_base(foundation, pipe, allow_pickle)
    if denoiser_of(foundation) is None:
        raise ConfigError(f"foundation must be a diffusers pipeline or a model source, not {type(foundation).__name__}")
    mine, theirs = denoiser_of(pipe), denoiser_of(foundation)
    family = family_of_denoiser(mine)
    if family_of_denoiser(theirs) is not family or (
            family.self_attention_names(theirs) != family.self_attention_names(mine)):
        kind = "UNet" if getattr(pipe, "unet", None) is not None else "transformer"
        raise ConfigError(f"the foundation and the personalized pipeline have different {kind} architectures: FASA "
                          "mixes their attention layer by layer, so they must share one (family and blocks)")
    foundation.scheduler = _foundation_scheduler(pipe)  # the same sampler for both passes
    if hasattr(foundation, "set_progress_bar_config"):
        foundation.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return SeparateFoundation(foundation)


def _load_base(source: str | dict, pipe, allow_pickle: bool):
    """A base-model source (text, or a recorded ModelConfig) as a pipeline beside ``pipe``, in its dtype."""
    from ..config import ModelConfig
    from ..models.loading import load_components

    settings = {"pretrained": source} if isinstance(source, str) else {
        k: v for k, v in source.items() if k in ModelConfig.model_fields}
    cfg = ModelConfig(**{**settings, "allow_pickle": allow_pickle})  # the caller's choice, never a record's
    denoiser = denoiser_of(pipe)
    base = load_components(cfg, dtype=denoiser.dtype).pipeline()
    base.to(denoiser.device)
    return base
