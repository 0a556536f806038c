"""Custom Diffusion (Kumari et al., CVPR 2023): tune only the cross-attention projections that read the text.

In every cross-attention layer (``attn2``) the keys and values of the text tokens c_j become

    k_j = W'_k c_j,  v_j = W'_v c_j   with W'_k, W'_v initialised from W_k, W_v and trained,

together with the modifier tokens (the concepts' learned identifiers, ``initializer_token``); everything else is
frozen. ``custom_diffusion_params: crossattn`` also trains the layer's query and output projections. The loss is
DreamBooth's (instance ε-MSE plus the optional prior term). As in the official recipe, the first (BOS) token's
K/V are detached, so no gradient flows through them: this is diffusers' ``CustomDiffusionAttnProcessor2_0``,
used here as is.

Joint attention (SD3, FLUX), this project's analogue: an MMDiT has no separate cross-attention, but each joint
block projects the text tokens to keys and values with their own weights (``attn.add_k_proj``, ``attn.add_v_proj``)
before text and image attend together. Those are exactly the projections that turn c_j into k_j, v_j, so they are
what trains (FLUX's double-stream blocks, SD3's joint blocks; FLUX's single-stream blocks share one K/V projection
between text and image and stay frozen). ``crossattn`` is refused there: the image stream's Q and output
projections also carry its self-attention, which the paper keeps frozen. T5 has no BOS token to detach.

Saved as ``pytorch_custom_diffusion_weights.safetensors`` with diffusers' key names (joint attention: the
projections' own parameter names, e.g. ``transformer_blocks.0.attn.add_k_proj.weight``). Two traps of diffusers'
own loader (0.42): ``unet.load_attn_procs`` silently does nothing unless it is given ``_pipeline=pipe``, and a
safetensors file lacks the empty entries of the self-attention layers, which it then rejects. ``apply_weights``
works around both, and ``load_into`` checks that every saved tensor really sits in the UNet afterwards (the
silent non-load of diffusers #7261 is what made ClassDiffusion's authors warn users to uninstall peft).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save

from ..atomic import write_bytes_atomic
from ..errors import ConfigError, ModelLoadError
from ..models.components import Components
from ..families import family_of_denoiser
from .base import LearningRates
from ..sections import MethodSection
from .classdiffusion import SPLConfig
from .dreambooth import PRIORS, DreamBooth, LoraConfig

WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"


def _cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    return family_of_denoiser(unet).cross_attention_modules(unet)


def install_processors(unet, train_q_out: bool) -> None:
    """Custom Diffusion processors on every cross-attention layer; all other processors are left as they are."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    processors = dict(unet.attn_processors)
    for name, attn in _cross_attention_modules(unet).items():
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=train_q_out, hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features, out_bias=attn.to_out[0].bias is not None,
        ).to(attn.to_k.weight.device)
        with torch.no_grad():
            processor.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
            processor.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
            if train_q_out:
                processor.to_q_custom_diffusion.weight.copy_(attn.to_q.weight)
                processor.to_out_custom_diffusion[0].load_state_dict(attn.to_out[0].state_dict())
        processors[f"{name}.processor"] = processor
    unet.set_attn_processor(processors)


def processor_state_dict(unet, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The trained tensors under diffusers' keys (``...attn2.processor.to_k_custom_diffusion.weight``)."""
    return {f"{name}.processor.{key}": value for name, attn in _cross_attention_modules(unet).items()
            if isinstance(attn.processor, torch.nn.Module)  # diffusers' stock processors hold no weights
            for key, value in attn.processor.state_dict(keep_vars=keep_vars).items()}


def apply_weights(unet, state: dict[str, torch.Tensor]) -> None:
    """Install the saved processors on a plain UNet and check every tensor arrived."""
    train_q_out = any("to_q_custom_diffusion" in k for k in state)
    modules = _cross_attention_modules(unet)
    wanted = {k.split(".processor.")[0] for k in state}
    unknown = wanted - set(modules)
    if unknown:
        raise ModelLoadError(f"Custom Diffusion weights name cross-attention layers this UNet does not have "
                             f"(e.g. {sorted(unknown)[:2]}): they were trained on another base model")
    install_processors(unet, train_q_out)
    for name, attn in modules.items():
        prefix = f"{name}.processor."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise ModelLoadError(f"Custom Diffusion weights have no entry for {name}")
        attn.processor.load_state_dict(sub)
        attn.processor.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
    check_applied(unet, state)


def check_applied(unet, state: dict[str, torch.Tensor]) -> None:
    """Raise unless every saved tensor is what the UNet's processors now hold."""
    live = processor_state_dict(unet)
    missing = sorted(set(state) - set(live))
    # compared in the UNet's dtype: a float16 pipeline holds the file's float32 tensors rounded
    differing = [k for k in state if k in live and not torch.equal(live[k].detach(), state[k].to(live[k].device, live[k].dtype))]
    if missing or differing:
        raise ModelLoadError(f"Custom Diffusion weights were not applied to the UNet ({len(missing)} tensors missing, "
                             f"{len(differing)} different, e.g. {(missing + differing)[:2]}): generations would "
                             "silently look un-personalized")


def joint_text_kv(transformer) -> dict[str, torch.nn.Module]:
    """The text tokens' K/V projections of every joint-attention layer, by module name ({} for a UNet)."""
    return family_of_denoiser(transformer).text_kv_projections(transformer)


def apply_joint_weights(transformer, state: dict[str, torch.Tensor]) -> None:
    """Put saved joint-attention K/V projections into a transformer and check every tensor arrived."""
    params = {f"{name}.{key}": p for name, module in joint_text_kv(transformer).items()
              for key, p in module.named_parameters()}
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ModelLoadError(f"Custom Diffusion weights name projections this transformer does not have (e.g. "
                             f"{unknown[:2]}): they were trained on another base model")
    with torch.no_grad():
        for key, value in state.items():
            if params[key].shape != value.shape:
                raise ModelLoadError(f"Custom Diffusion weight {key} has shape {tuple(value.shape)}, the transformer's "
                                     f"{tuple(params[key].shape)}: it was trained on another base model")
            params[key].copy_(value)


class CustomDiffusionConfig(MethodSection):
    """``method`` with ``name: custom_diffusion``: no adapter or encoder choices, it trains what the paper does."""

    other_methods_keys = {"adapter": "full", "train_unet": True, "train_text_encoder": False, "lora": LoraConfig()}

    name: Literal["custom_diffusion"] = "custom_diffusion"
    custom_diffusion_params: Literal["crossattn_kv", "crossattn"] = Field("crossattn_kv", description="train cross-attention K/V only, or also its Q and output projections")
    prior: PRIORS = Field("none", description="prior preservation: none, class_images or auxiliary")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="lambda of the prior term")
    spl: SPLConfig | None = Field(None, description="ClassDiffusion's semantic preservation loss (null: off)")

    # read by the DreamBooth machinery it shares: the UNet's cross-attention trains; the text side only through
    # learned tokens
    train_unet: ClassVar[bool] = True
    train_text_encoder: ClassVar[bool] = False
    adapter: ClassVar[str] = "custom_diffusion"

    @classmethod
    def not_mine_message(cls, keys: list[str]) -> str:
        return (f"method.name custom_diffusion trains its own cross-attention projections (plus learned tokens); "
                f"remove {', '.join('method.' + k for k in keys)}")

    @model_validator(mode="after")
    def _consistent(self) -> "CustomDiffusionConfig":
        if self.prior == "base_prediction":
            raise ValueError("method.prior 'base_prediction' needs a frozen copy of what trains, which custom_diffusion "
                             "does not keep: use prior: class_images")
        if self.prior == "none" and "prior_loss_weight" in self.model_fields_set and self.prior_loss_weight != 1.0:
            raise ValueError("method.prior_loss_weight is set but method.prior is 'none': choose class_images or base_prediction")
        return self


class CustomDiffusion(DreamBooth):
    name = "custom_diffusion"

    def check(self, components: Components, training=None) -> None:
        super().check(components, training)
        if not joint_text_kv(components.denoiser):
            components.family.cross_attention_modules(components.denoiser)  # a family without either refuses
        elif self.config.custom_diffusion_params == "crossattn":
            raise ConfigError(f"method.custom_diffusion_params 'crossattn' on {components.family.name}'s joint "
                              "attention would train the image stream's query and output projections, which also do "
                              "its self-attention (the paper keeps that frozen): use crossattn_kv (the text tokens' "
                              "K/V projections)")

    def configure(self, components: Components) -> None:
        self.trained = [components.denoiser_name]
        joint = joint_text_kv(components.denoiser)
        if joint:
            for projection in joint.values():
                projection.requires_grad_(True)
            return
        install_processors(components.unet, train_q_out=self.config.custom_diffusion_params == "crossattn")
        for attn in _cross_attention_modules(components.unet).values():
            attn.processor.requires_grad_(True)

    def exported_components(self) -> list[str]:
        return []

    def parameter_groups(self, components: Components, lrs: LearningRates) -> list[dict]:
        return [{"name": components.denoiser_name, "params": list(self._weights(components).values()), "lr": lrs.denoiser}]

    @staticmethod
    def _weights(components: Components) -> dict[str, torch.Tensor]:
        joint = joint_text_kv(components.denoiser)
        if joint:
            return {f"{name}.{key}": p for name, module in joint.items() for key, p in module.named_parameters()}
        return processor_state_dict(components.unet, keep_vars=True)

    def save_artifact(self, components: Components, out_dir: Path, export) -> dict:
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, export.save_dtype)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self._weights(components).items()}
        write_bytes_atomic(out_dir / WEIGHTS, save(state, metadata={"format": "pt"}))
        attention = "joint" if joint_text_kv(components.denoiser) else "cross"
        return {"type": "custom_diffusion", "path": WEIGHTS, "params": self.config.custom_diffusion_params,
                "attention": attention}

    @classmethod
    def load_artifact(cls, pipeline, folder: Path, record: dict):
        state = load_file(str(folder / record["artifact"]["path"]))
        if record["artifact"].get("attention") == "joint":
            apply_joint_weights(pipeline.transformer, state)
        else:
            apply_weights(pipeline.unet, state)
        return pipeline


def foundation_processors(unet) -> dict:
    """Stock processors for the Custom Diffusion ones of ``unet``, keyed like ``unet.attn_processors``: swapped in,
    the UNet attends as its base model did (FreeCure's foundation). Empty when it carries no Custom Diffusion."""
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        CustomDiffusionAttnProcessor,
        CustomDiffusionAttnProcessor2_0,
        CustomDiffusionXFormersAttnProcessor,
    )

    custom = (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0, CustomDiffusionXFormersAttnProcessor)
    return {name: AttnProcessor2_0() for name, p in unet.attn_processors.items() if isinstance(p, custom)}
