"""The rectified-flow (flow-matching) training objective of the transformer families (SD3/SD3.5, FLUX.1).

For a clean latent x and noise ε, draw a noise level σ ∈ (0, 1] and train on

    x_σ = (1 − σ) x + σ ε,   target ε − x   (the velocity),

weighted per sample. As diffusers' ``train_dreambooth_lora_sd3.py`` / ``..._flux.py``: a number u ∈ [0, 1) is
drawn by ``timestep_sampling`` (``uniform``; ``logit_normal``: sigmoid of N(mean, std); ``mode``: the SD3 paper's
mode sampling with ``mode_scale``), u picks one of the scheduler's training timesteps, whose σ (already shifted
by the scheduler's ``shift``) is looked up; ``loss_weighting`` is ``none``, ``sigma_sqrt`` (σ⁻²) or ``cosmap``
(2 / (π (1 − 2σ + 2σ²))). With ``precondition_outputs`` (SD3's option) the output is turned into an x0 estimate,
``x_σ − σ · output``, and the target is x.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .base import NoisedBatch

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


class FlowMatchingObjective:
    def __init__(self, scheduler_config, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, loss_weighting: str = "none",
                 precondition_outputs: bool = False):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep sampling {timestep_sampling!r}: use one of {', '.join(TIMESTEP_SAMPLING)}")
        if loss_weighting not in LOSS_WEIGHTING:
            raise ValueError(f"loss weighting {loss_weighting!r}: use one of {', '.join(LOSS_WEIGHTING)}")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.timestep_sampling, self.loss_weighting = timestep_sampling, loss_weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs

    def __call__(self, latents: torch.Tensor) -> NoisedBatch:
        bsz, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, device=device, dtype=latents.dtype)
        u = compute_density_for_timestep_sampling(self.timestep_sampling, bsz, self.logit_mean, self.logit_std,
                                                  self.mode_scale)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(device)
        sigmas = self.scheduler.sigmas[indices].to(device=device, dtype=latents.dtype)
        sigmas = sigmas.view(bsz, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if self.precondition_outputs else noise - latents
        weights = compute_loss_weighting_for_sd3(self.loss_weighting, sigmas).reshape(bsz).float()
        return NoisedBatch(noisy, timesteps, target, weights, sigmas)

    def output(self, model_pred: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """The denoiser's velocity, or (preconditioned) the x0 estimate it implies."""
        if not self.precondition_outputs:
            return model_pred
        return noised.noisy_latents - noised.sigmas * model_pred
