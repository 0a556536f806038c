"""The explicit parts of a model (denoiser, VAE, text encoders, tokenizers, scheduler) and its family, which
knows what to do with them (``t2i_personal/families``).

Names are the diffusers pipeline's own: the denoiser is ``unet`` (SD, SDXL) or ``transformer`` (SD3, FLUX);
text encoders are ``text_encoder``, ``text_encoder_2`` (SDXL's and SD3's second CLIP, FLUX's T5) and
``text_encoder_3`` (SD3's T5), each with its tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families import Conditioning, ModelFamily
from ..families.base import tokenizer_name

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_NAMES = ("unet", "transformer")


@dataclass
class Components:
    family: ModelFamily
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # inference scheduler, as the base model ships it
    unet: torch.nn.Module | None = None
    transformer: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object | None = None
    source: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.unet is not None else "transformer"

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def text_encoder_names(self) -> list[str]:
        return [n for n in TEXT_ENCODER_NAMES if getattr(self, n) is not None]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self, n) for n in self.text_encoder_names]

    @property
    def tokenizers(self) -> list:
        return [getattr(self, tokenizer_name(n)) for n in self.text_encoder_names]

    @property
    def tunable_text_encoder_names(self) -> list[str]:
        """The text encoders that text-encoder training, learned tokens and SPL act on (the CLIP encoders; a
        T5 encoder stays frozen, as in diffusers' FLUX and SD3 scripts)."""
        return [n for n in self.family.tunable_text_encoders if getattr(self, n) is not None]

    @property
    def tunable_text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self, n) for n in self.tunable_text_encoder_names]

    @property
    def tunable_tokenizers(self) -> list:
        return self.tokenizers_of(self.tunable_text_encoder_names)

    def tokenizers_of(self, text_encoder_names: list[str]) -> list:
        return [getattr(self, tokenizer_name(n)) for n in text_encoder_names]

    @property
    def token_text_encoder_names(self) -> list[str]:
        """The text encoders that learn new tokens: the tunable CLIPs, and T5 when ``training.learn_tokens_in_t5``
        asked for it (``extras["tokens_in_t5"]``)."""
        t5 = getattr(self.family, "t5_name", "")
        extra = [t5] if self.extras.get("tokens_in_t5") and t5 and getattr(self, t5) is not None else []
        return self.tunable_text_encoder_names + extra

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """Every model module by component name (the ones this model has)."""
        return {n: getattr(self, n) for n in (*DENOISER_NAMES, "vae", *TEXT_ENCODER_NAMES) if getattr(self, n) is not None}

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
