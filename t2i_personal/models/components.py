"""The explicit parts of a Stable Diffusion model (SD 1.x/2.x or SDXL) and the text conditioning both share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from ..errors import ConfigError

Family = Literal["sd", "sdxl"]


@dataclass
class Components:
    family: Family
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
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def noise_scheduler(self, prediction_type: str | None = None) -> DDPMScheduler:
        kwargs = {"prediction_type": prediction_type} if prediction_type else {}
        return DDPMScheduler.from_config(self.scheduler.config, **kwargs)

    @property
    def pipeline_class(self) -> type:
        return StableDiffusionXLPipeline if self.family == "sdxl" else StableDiffusionPipeline

    def pipeline(self, scheduler=None):
        """A diffusers pipeline sharing these modules (no copies) with its own scheduler (schedulers hold state)."""
        scheduler = scheduler or type(self.scheduler).from_config(self.scheduler.config)
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    # ------------------------------------------------------------------ text conditioning

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer; a prompt longer than the encoder's window is an error, not a silent cut."""
        ids = []
        if not prompts:
            return [torch.zeros(0, tok.model_max_length, dtype=torch.long) for tok in self.tokenizers]
        for tok in self.tokenizers:
            limit = tok.model_max_length
            for prompt in prompts:
                n = len(tok(prompt, truncation=False).input_ids)
                if n > limit:
                    raise ConfigError(f"prompt {prompt!r} is {n} tokens long; the text encoder reads at most {limit} "
                                      f"(including start/end tokens). Shorten the prompt or caption.")
            ids.append(tok(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids)
        return ids

    def encode(self, input_ids: list[torch.Tensor], text_encoders: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder_hidden_states, pooled) exactly as the matching diffusers pipeline conditions the UNet."""
        encoders = text_encoders or self.text_encoders
        # next(parameters()) rather than .device: the encoder may be wrapped (DistributedDataParallel)
        if self.family == "sd":
            return encoders[0](input_ids[0].to(next(encoders[0].parameters()).device))[0], None
        hidden, pooled = [], None
        for encoder, ids in zip(encoders, input_ids):
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_size, crop_top_left, target_size, dtype, device) -> torch.Tensor:
    """SDXL micro-conditioning: (orig h, orig w, crop top, crop left, target h, target w) per sample."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_size, crop_top_left, target_size)]
    return torch.tensor(rows, dtype=dtype, device=device)
