"""The DDPM training objective of the UNet families (SD 1.x/2.x, SDXL).

For a clean latent x and noise ε, sample t ~ U{0, ..., T-1} and train on

    x_t = sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε,   target ε (epsilon-prediction) or v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x,

with the scheduler's own ``add_noise`` / ``get_velocity``. Optional: an offset noise term (``noise_offset``) and
min-SNR-γ per-sample weights ``min(SNR, γ) / SNR`` (``/ (SNR + 1)`` for v-prediction), as diffusers' scripts.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .base import NoisedBatch


class DDPMObjective:
    def __init__(self, scheduler_config, prediction_type: str, snr_gamma: float | None = None,
                 noise_offset: float = 0.0):
        self.scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type)
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def __call__(self, latents: torch.Tensor) -> NoisedBatch:
        bsz, device = latents.shape[0], latents.device
        # randn_like would follow the memory layout of a (non-contiguous) VAE posterior and draw differently
        noise = torch.randn(latents.shape, device=device, dtype=latents.dtype)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(bsz, latents.shape[1], 1, 1, device=device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,), device=device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisedBatch(noisy, timesteps, target, self.loss_weights(timesteps))

    def describe(self) -> dict:
        return {"objective": "ddpm", "prediction_type": self.prediction_type, "snr_gamma": self.snr_gamma,
                "noise_offset": self.noise_offset}

    def output(self, model_pred: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """The denoiser's output in the target's terms (as it is, for DDPM)."""
        return model_pred

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape[0], device=timesteps.device)
        snr = compute_snr(self.scheduler, timesteps)
        return torch.clamp(snr, max=self.snr_gamma) / (snr + 1 if self.prediction_type == "v_prediction" else snr)
