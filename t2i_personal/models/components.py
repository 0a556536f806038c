"""The explicit parts of a model (denoiser, VAE, text encoders, tokenizers, scheduler) and its family, which
knows what to do with them (``t2i_personal/families``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families import Conditioning, ModelFamily


@dataclass
class Components:
    family: ModelFamily
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # inference scheduler, as the base model ships it
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    source: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def text_encoder_names(self) -> list[str]:
        return [n for n in ("text_encoder", "text_encoder_2") if getattr(self, n) is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """Every model module by component name (the ones this model has)."""
        return {n: getattr(self, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(self, n) is not None}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pipeline_class(self) -> type:
        return self.family.pipeline_class

    def pipeline(self, scheduler=None):
        """A diffusers pipeline sharing these modules (no copies) with its own scheduler (schedulers hold state)."""
        return self.family.pipeline(self, scheduler or type(self.scheduler).from_config(self.scheduler.config))

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer; a prompt longer than the encoder's window is an error, not a silent cut."""
        return self.family.tokenize(self, prompts)

    def encode(self, input_ids: list[torch.Tensor], text_encoders: list | None = None) -> Conditioning:
        """The text conditioning exactly as the family's diffusers pipeline computes it."""
        return self.family.encode(self, input_ids, text_encoders)
