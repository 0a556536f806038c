"""SDXL: two CLIP text encoders (penultimate hidden states concatenated, the second's pooled projection) and
micro-conditioning on the original size, crop and target size of each training image."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from .base import Conditioning, FreeCureDefaults
from .sd import UNetFamily, device_of

SINGLE_FILE_KEY = "conditioner.embedders.1.model"  # the second (OpenCLIP bigG) text encoder


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoder_names = tunable_text_encoders = ("text_encoder", "text_encoder_2")
    vae_needs_float32_in_fp16 = True
    freecure = FreeCureDefaults(omega=1.5, fasa_decoder_blocks=20, map_factor=4)

    def claims_pipeline(self, class_name: str) -> bool:
        return class_name.startswith("StableDiffusionXL")

    def claims_single_file(self, keys: set[str]) -> bool:
        return any(k.startswith(SINGLE_FILE_KEY) for k in keys)

    def claims_denoiser(self, denoiser) -> bool:
        config = getattr(denoiser, "config", None)  # pooled text + time ids
        return getattr(config, "addition_embed_type", None) == "text_time"

    def encode(self, components, input_ids, text_encoders=None) -> Conditioning:
        hidden, pooled = [], None
        for encoder, ids in zip(text_encoders or components.text_encoders, input_ids):
            out = encoder(ids.to(device_of(encoder)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def add_image_conditioning(self, cond, original_sizes, crops_top_left, target_size) -> Conditioning:
        """Time ids per sample: (original h, w, crop top, left, target h, w)."""
        rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crops_top_left)]
        dtype, device = cond.encoder_hidden_states.dtype, cond.encoder_hidden_states.device
        return cond.replace(time_ids=torch.tensor(rows, dtype=dtype, device=device))

    def build_tiny(self, spec: dict, seed: int, source: str):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from ..models.tiny import seeded, tokenizer_from_spec

        components = super().build_tiny(spec, seed, source)
        components.text_encoder_2 = seeded(
            seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])))
        components.tokenizer_2 = tokenizer_from_spec(spec, "tokenizer_2_pad_token")
        return components

    def save_single_file(self, components, path, dtype, metadata) -> None:
        from ..models.single_file import save_original_sdxl_checkpoint

        save_original_sdxl_checkpoint(components.unet, components.vae, components.text_encoder,
                                      components.text_encoder_2, path, dtype=dtype, metadata=metadata)
