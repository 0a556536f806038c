"""FLUX.1 (dev, schnell): a ``FluxTransformer2DModel`` over 2×2-packed latent tokens with rotary position ids,
CLIP-L's pooled vector and T5's sequence as text, and (dev) an embedded guidance value instead of CFG.

Conditioning and the forward call are what ``FluxPipeline`` and diffusers' ``train_dreambooth_lora_flux.py`` do:
latents ``(z − shift) · scale`` packed into (B, h/2 · w/2, 4C); image ids (0, row, col) per packed token; text ids
zeros (S, 3); ``timestep = t / 1000``; ``guidance = training.guidance_scale`` (default 3.5) when the
transformer has a guidance embedding (dev), none otherwise (schnell).
"""

from __future__ import annotations

import logging

import torch
from diffusers import FluxPipeline

from ..errors import ConfigError
from .base import Conditioning, FreeCureDefaults
from .transformer import TransformerFamily, device_of, unwrapped

logger = logging.getLogger(__name__)
DEFAULT_GUIDANCE = 3.5  # diffusers' train_dreambooth_lora_flux.py --guidance_scale


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 · w/2, 4C) tokens back to [B, C, h, w] latents (``height``/``width`` in latent pixels)."""
    return FluxPipeline._unpack_latents(tokens, height, width, vae_scale_factor=1)


class Flux(TransformerFamily):
    name = "flux"
    pipeline_class = FluxPipeline
    transformer_class_name = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
    tunable_text_encoders = ("text_encoder",)
    t5_name = "text_encoder_2"
    token_file_keys = {"text_encoder": "clip_l", "text_encoder_2": "t5"}
    default_max_sequence_length = 512
    default_guidance_scale = DEFAULT_GUIDANCE
    # freecure/joint_fasa.py: ω (DEFAULT_JOINT_OMEGA), layers and the start calibrated on the FLUX toy model
    freecure = FreeCureDefaults(omega=1.0, attention="joint", fasa_start=0.25)
    latent_patch = 2
    # diffusers' FLUX script: every attention projection and feed-forward of the double-stream blocks; the names
    # also match the single-stream blocks' attention (attn.to_q/k/v), as they do there
    lora_target_modules = {
        "denoiser": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"],
        "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}

    def claims_pipeline(self, class_name: str) -> bool:
        return class_name.startswith("Flux")

    def claims_single_file(self, keys: set[str]) -> bool:
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    def load_transformer_file(self, path, config_dir, dtype):
        from ..models.flux_single_file import load_flux_transformer_single_file

        return load_flux_transformer_single_file(path, config_dir, dtype)

    def save_transformer_file(self, transformer, path, dtype, metadata) -> None:
        from ..models.flux_single_file import save_flux_transformer_single_file

        save_flux_transformer_single_file(transformer, path, dtype, metadata)

    def kohya_lora_state(self, peft_state: dict, alpha: float) -> dict:
        """FLUX's original block names with fused qkv / linear1 (``models/kohya_flux.py``), what ComfyUI and kohya
        read and diffusers converts on ``load_lora_weights``."""
        from ..models.kohya_flux import flux_lora_to_kohya

        if any("lora_magnitude_vector" in k for k in peft_state):  # no DoRA key in diffusers' kohya-FLUX converter
            logger.warning("DoRA on FLUX: no kohya file is written (diffusers' kohya-FLUX converter, the test oracle "
                           "here, has no DoRA scale); the diffusers file carries the DoRA magnitudes")
            return None
        return flux_lora_to_kohya(peft_state, alpha)

    def training_guidance(self, denoiser, training) -> float | None:
        if unwrapped(denoiser).config.guidance_embeds:
            return training.guidance_scale or DEFAULT_GUIDANCE
        if training.guidance_scale is not None:
            raise ConfigError("training.guidance_scale is set but this FLUX model has no guidance embedding "
                              "(FLUX.1-schnell is not guidance-distilled): remove training.guidance_scale")
        return None

    def encode(self, components, input_ids, text_encoders=None) -> Conditioning:
        clip, t5 = text_encoders or components.text_encoders
        pooled = clip(input_ids[0].to(device_of(clip)), output_hidden_states=False).pooler_output
        sequence = t5(input_ids[1].to(device_of(t5)), output_hidden_states=False)[0]
        return Conditioning(sequence, pooled)

    def denoise(self, denoiser, noisy_latents, timesteps, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, device=device, dtype=dtype)
        guidance = None if cond.guidance is None else cond.guidance.to(device, torch.float32)
        out = denoiser(hidden_states=pack(noisy_latents), timestep=timesteps.to(dtype) / 1000, guidance=guidance,
                       pooled_projections=cond.pooled, encoder_hidden_states=cond.encoder_hidden_states,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack(out, h, w)

    def unpack_latents(self, pipe, latents, height, width) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def build_tiny(self, spec: dict, seed: int, source: str):
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        from ..models.components import Components
        from ..models.tiny import scheduler_from_spec, seeded

        return Components(family=self, source=source, scheduler=scheduler_from_spec(spec),
                          transformer=seeded(seed, lambda: FluxTransformer2DModel(**spec["transformer"])),
                          vae=seeded(seed + 1, lambda: AutoencoderKL(**spec["vae"])),
                          **self._tiny_encoders(spec, seed))
