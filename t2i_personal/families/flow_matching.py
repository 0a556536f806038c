"""The rectified-flow (flow-matching) training objective of the transformer families (SD3/SD3.5, FLUX.1).

For a clean latent x and noise ε, draw a noise level σ ∈ (0, 1] and train on

    x_σ = (1 − σ) x + σ ε,   target ε − x   (the velocity),

weighted per sample. As diffusers' ``train_dreambooth_lora_sd3.py`` / ``..._flux.py``: a number u ∈ [0, 1) is
drawn by ``timestep_sampling`` (``uniform``; ``logit_normal``: sigmoid of N(mean, std); ``mode``: the SD3 paper's
mode sampling with ``mode_scale``), u picks one of the scheduler's training timesteps, whose σ (already shifted
by the scheduler's ``shift``) is looked up; ``loss_weighting`` is ``none``, ``sigma_sqrt`` (σ⁻²) or ``cosmap``
(2 / (π (1 − 2σ + 2σ²))). With ``precondition_outputs`` (SD3's option) the output is turned into an x0 estimate,
``x_σ − σ · output``, and the target is x.

``shift`` moves the drawn σ towards noise after the lookup, as kohya's ``--timestep_sampling shift / flux_shift``
(diffusers' scripts have no such option and train on the scheduler's own σ table):

    σ' = s σ / (1 + (s − 1) σ)                     a fixed shift s,
    σ' = e^μ / (e^μ + 1/σ − 1),  μ = linear in the image's token count   ("resolution": FLUX's inference shift,
                                  0.5 at 256 tokens to 1.15 at 4096, the scheduler config's base/max values).

The timestep the denoiser reads is σ' · num_train_timesteps, as the scheduler's own table is.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .base import NoisedBatch

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


class FlowMatchingObjective:
    def __init__(self, scheduler_config, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, loss_weighting: str = "none",
                 precondition_outputs: bool = False, shift: float | str | None = None, patch_size: int = 1):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep sampling {timestep_sampling!r}: use one of {', '.join(TIMESTEP_SAMPLING)}")
        if loss_weighting not in LOSS_WEIGHTING:
            raise ValueError(f"loss weighting {loss_weighting!r}: use one of {', '.join(LOSS_WEIGHTING)}")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.timestep_sampling, self.loss_weighting = timestep_sampling, loss_weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs
        if isinstance(shift, str) and shift != "resolution":
            raise ValueError(f"shift {shift!r}: use a number, 'resolution' or none")
        self.shift, self.patch_size = shift, patch_size

    def __call__(self, latents: torch.Tensor) -> NoisedBatch:
        bsz, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, device=device, dtype=latents.dtype)
        u = compute_density_for_timestep_sampling(self.timestep_sampling, bsz, self.logit_mean, self.logit_std,
                                                  self.mode_scale)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(device)
        sigmas = self.scheduler.sigmas[indices].to(device=device, dtype=latents.dtype)
        if self.shift is not None:
            sigmas = self.shifted(sigmas, latents.shape[-2:])
            timesteps = sigmas * self.scheduler.config.num_train_timesteps
        sigmas = sigmas.view(bsz, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if self.precondition_outputs else noise - latents
        weights = compute_loss_weighting_for_sd3(self.loss_weighting, sigmas).reshape(bsz).float()
        return NoisedBatch(noisy, timesteps, target, weights, sigmas)

    def shifted(self, sigmas: torch.Tensor, latent_size) -> torch.Tensor:
        if self.shift == "resolution":
            c = self.scheduler.config
            tokens = (latent_size[0] // self.patch_size) * (latent_size[1] // self.patch_size)
            slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (
                c.get("max_image_seq_len", 4096) - c.get("base_image_seq_len", 256))
            mu = c.get("base_shift", 0.5) + slope * (tokens - c.get("base_image_seq_len", 256))
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def describe(self) -> dict:
        """The objective's settings as they were resolved (recorded in personalization.json)."""
        return {"objective": "flow_matching", "timestep_sampling": self.timestep_sampling,
                "logit_mean": self.logit_mean, "logit_std": self.logit_std, "mode_scale": self.mode_scale,
                "loss_weighting": self.loss_weighting, "precondition_outputs": self.precondition_outputs,
                "shift": self.shift}

    def output(self, model_pred: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """The denoiser's velocity, or (preconditioned) the x0 estimate it implies."""
        if not self.precondition_outputs:
            return model_pred
        return noised.noisy_latents - noised.sigmas * model_pred
