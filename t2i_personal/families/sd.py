"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet with cross-attention, DDPM with epsilon or v-prediction."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from .base import Conditioning, FreeCureDefaults, ModelFamily
from .ddpm import DDPMObjective


def device_of(module: torch.nn.Module) -> torch.device:
    # next(parameters()) rather than .device: the encoder may be wrapped (DistributedDataParallel)
    return next(module.parameters()).device


def dora_scale_key(kohya_key: str) -> str:
    """diffusers' kohya converter (0.42) leaves DoRA magnitudes as ``lora_unet_x.to_q.lora_magnitude_vector``;
    LyCORIS / kohya / ComfyUI / A1111 read ``lora_unet_x_to_q.dora_scale`` (diffusers' own kohya loader drops it)."""
    return kohya_key[: -len(".lora_magnitude_vector")].replace(".", "_") + ".dora_scale"


class UNetFamily(ModelFamily):
    """What SD and SDXL share: a ``UNet2DConditionModel`` (``attn1`` self-, ``attn2`` cross-attention) trained
    with DDPM."""

    def objective(self, components, training) -> DDPMObjective:
        return DDPMObjective(components.scheduler.config, components.scheduler.config.prediction_type,
                             snr_gamma=training.snr_gamma, noise_offset=training.noise_offset)

    def denoise(self, denoiser, noisy_latents, timesteps, cond: Conditioning) -> torch.Tensor:
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=cond.encoder_hidden_states,
                        added_cond_kwargs=added, return_dict=False)[0]

    def lora_state_for_saving(self, peft_state: dict) -> dict:
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)  # as diffusers' SD / SDXL scripts save it

    def kohya_lora_state(self, peft_state: dict, alpha: float) -> dict:
        """``lora_unet_*``, ``lora_te_*`` (SD) or ``lora_te1_*``/``lora_te2_*`` (SDXL) keys via diffusers' converter."""
        from diffusers.utils import convert_state_dict_to_kohya

        out = {}
        for key, value in convert_state_dict_to_kohya(peft_state).items():
            if key.endswith(".alpha"):  # diffusers writes alpha = rank (scale 1); other UIs must scale as we trained
                value = torch.tensor(alpha)
            elif key.endswith(".lora_magnitude_vector"):  # LyCORIS' DoRA: one norm per output row, shape (out, 1)
                key, value = dora_scale_key(key), value.reshape(-1, 1)
            out[self.kohya_lora_key(key)] = value
        return out

    def kohya_lora_key(self, key: str) -> str:
        return key

    def cross_attention_modules(self, denoiser) -> dict[str, torch.nn.Module]:
        return {name: module for name, module in denoiser.named_modules() if name.endswith("attn2")}

    def self_attention_names(self, denoiser) -> list[str]:
        return [name for name, _ in denoiser.named_modules() if name.endswith("attn1")]

    def build_tiny(self, spec: dict, seed: int, source: str):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from ..models.components import Components
        from ..models.tiny import scheduler_from_spec, seeded, tokenizer_from_spec

        return Components(
            family=self, source=source,
            unet=seeded(seed, lambda: UNet2DConditionModel(**spec["unet"])),
            vae=seeded(seed + 1, lambda: AutoencoderKL(**spec["vae"])),
            text_encoder=seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))),
            tokenizer=tokenizer_from_spec(spec, "tokenizer_pad_token"), scheduler=scheduler_from_spec(spec))


class StableDiffusion(UNetFamily):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    freecure = FreeCureDefaults(omega=0.5, fasa_decoder_blocks=None, map_factor=2)

    def claims_pipeline(self, class_name: str) -> bool:
        # every SD 1.x/2.x pipeline class (text-to-image, img2img, inpaint, ...) shares the components
        return "Diffusion" in class_name and "XL" not in class_name

    def claims_single_file(self, keys: set[str]) -> bool:
        return any(k.startswith("model.diffusion_model.") for k in keys)

    def claims_denoiser(self, denoiser) -> bool:
        return type(denoiser).__name__ == "UNet2DConditionModel"

    def encode(self, components, input_ids, text_encoders=None) -> Conditioning:
        encoder = (text_encoders or components.text_encoders)[0]
        return Conditioning(encoder(input_ids[0].to(device_of(encoder)))[0])

    def kohya_lora_key(self, key: str) -> str:
        return key.replace("lora_te1_", "lora_te_")  # one text encoder: A1111's SD 1.x/2.x prefix has no index

    def save_single_file(self, components, path, dtype, metadata) -> None:
        from ..models.single_file import save_original_sd_checkpoint

        save_original_sd_checkpoint(components.unet, components.vae, components.text_encoder, path, dtype=dtype,
                                    metadata=metadata)
