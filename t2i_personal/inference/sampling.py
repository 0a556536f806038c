"""Sampling shared by validation grids and class-image generation."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(pipe, prompts: list[str], *, generators, autocast_dtype: torch.dtype | None = None, **kwargs) -> list:
    """Denoise under mixed-precision autocast, then decode outside it in the VAE's own dtype.

    Decoding under fp16 autocast would run even a float32 VAE in fp16, where SDXL's VAE overflows to NaN (black
    images); the UNet, whose trainable tensors stay float32 while frozen ones are cast, needs the autocast.
    """
    from ..families import call_defaults

    kwargs = {**call_defaults(pipe), **kwargs}
    device = pipe.vae.device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        latents = pipe(prompts, output_type="latent", generator=generators, **kwargs).images
    if "height" in kwargs and "width" in kwargs:
        from ..families import family_of_pipeline

        latents = family_of_pipeline(pipe).unpack_latents(pipe, latents, kwargs["height"], kwargs["width"])
    return decode_latents(pipe, latents)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images from ``output_type="latent"`` latents, as the pipelines decode them: in the VAE's own dtype,
    except an fp16 VAE whose config asks for ``force_upcast`` (SDXL's overflows to NaN in fp16), which decodes in
    float32; SDXL-style ``latents_mean``/``latents_std`` are undone when the VAE has them."""
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(next(vae.parameters()).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            latents = latents + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype)
    return pipe.image_processor.postprocess(images.float(), output_type="pil")
