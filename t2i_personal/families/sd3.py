"""Stable Diffusion 3 / 3.5: an ``SD3Transformer2DModel`` (MMDiT) over patches of the latents, two CLIP encoders
with projection and a T5 encoder, classifier-free guidance.

Conditioning is what ``StableDiffusion3Pipeline.encode_prompt`` builds: each CLIP's penultimate hidden states,
concatenated on the feature axis and zero-padded to T5's width, stacked on the sequence axis in front of T5's
states (zeros when the model ships without T5); the pooled vector is the two CLIPs' projected pooled outputs
concatenated. The transformer reads the raw timestep (σ · 1000); latents are ``(z − shift) · scale``. Training
defaults follow diffusers' ``train_dreambooth_lora_sd3.py``: logit-normal timestep sampling, no loss weighting.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from .base import Conditioning, FreeCureDefaults
from .transformer import TransformerFamily, device_of, unwrapped


class StableDiffusion3(TransformerFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    transformer_class_name = "SD3Transformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
    tunable_text_encoders = ("text_encoder", "text_encoder_2")
    t5_name = "text_encoder_3"
    token_file_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"}
    default_max_sequence_length = 256
    default_guidance_scale = 7.0
    freecure = FreeCureDefaults(omega=1.0, attention="joint")  # freecure/joint_fasa.py (DEFAULT_JOINT_OMEGA)
    default_timestep_sampling = "logit_normal"
    # diffusers' SD3 script: the attention projections of the joint blocks (image and text streams)
    lora_target_modules = {
        "denoiser": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                     "attn.to_out.0", "attn.to_q", "attn.to_v"],
        "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}

    def claims_pipeline(self, class_name: str) -> bool:
        return class_name.startswith("StableDiffusion3")

    def claims_single_file(self, keys: set[str]) -> bool:
        return any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys)

    def load_transformer_file(self, path, config_dir, dtype):
        from ..models.sd3_single_file import load_sd3_transformer_single_file

        return load_sd3_transformer_single_file(path, config_dir, dtype)

    def save_transformer_file(self, transformer, path, dtype, metadata) -> None:
        from ..models.sd3_single_file import save_sd3_transformer_single_file

        save_sd3_transformer_single_file(transformer, path, dtype, metadata)

    def latent_patch_of(self, denoiser) -> int:
        return unwrapped(denoiser).config.patch_size

    def encode(self, components, input_ids, text_encoders=None) -> Conditioning:
        encoders = list(text_encoders or components.text_encoders)
        hidden, pooled = [], []
        for encoder, ids in zip(encoders[:2], input_ids[:2]):
            out = encoder(ids.to(device_of(encoder)), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        if len(encoders) > 2:
            t5 = encoders[2](input_ids[2].to(device_of(encoders[2])))[0]
        else:  # SD3 without T5: zeros, as the pipeline
            width = components.transformer.config.joint_attention_dim
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length(components), width)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def denoise(self, denoiser, noisy_latents, timesteps, cond: Conditioning) -> torch.Tensor:
        return denoiser(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=cond.encoder_hidden_states,
                        pooled_projections=cond.pooled, return_dict=False)[0]

    def build_tiny(self, spec: dict, seed: int, source: str):
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        from ..models.components import Components
        from ..models.tiny import scheduler_from_spec, seeded

        return Components(family=self, source=source, scheduler=scheduler_from_spec(spec),
                          transformer=seeded(seed, lambda: SD3Transformer2DModel(**spec["transformer"])),
                          vae=seeded(seed + 1, lambda: AutoencoderKL(**spec["vae"])),
                          **self._tiny_encoders(spec, seed))
