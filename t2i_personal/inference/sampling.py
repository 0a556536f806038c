"""Sampling shared by validation grids and class-image generation."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(pipe, prompts: list[str], *, generators, autocast_dtype: torch.dtype | None = None, **kwargs) -> list:
    """Denoise under mixed-precision autocast, then decode outside it in the VAE's own dtype.

    Decoding under fp16 autocast would run even a float32 VAE in fp16, where SDXL's VAE overflows to NaN (black
    images); the UNet, whose trainable tensors stay float32 while frozen ones are cast, needs the autocast.
    """
    device = pipe.unet.device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        latents = pipe(prompts, output_type="latent", generator=generators, **kwargs).images
    return decode_latents(pipe, latents)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images from ``output_type="latent"`` latents, decoded in the VAE's own dtype."""
    vae = pipe.vae
    latents = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    images = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pil")
