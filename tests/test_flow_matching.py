"""The flow-matching objective (``families/flow_matching.py``) equals what diffusers' SD3/FLUX DreamBooth scripts
compute with ``training_utils`` and ``FlowMatchEulerDiscreteScheduler``, for every timestep sampling and loss
weighting."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from t2i_personal.families.flow_matching import FlowMatchingObjective

SHIFTED = FlowMatchEulerDiscreteScheduler(shift=3.0).config  # SD3's scheduler


def reference(latents, sampling, seed, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    """The scripts' steps in their order: noise, then u, then timesteps and sigmas looked up by timestep."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SHIFTED)
    torch.manual_seed(seed)
    noise = torch.randn(latents.shape)
    u = compute_density_for_timestep_sampling(sampling, latents.shape[0], logit_mean, logit_std, mode_scale)
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    sigmas = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    noisy = scheduler.scale_noise(latents, timesteps, noise)
    return noise, timesteps, sigmas, noisy


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_noising_and_velocity_target_match_the_scheduler(sampling):
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    objective = FlowMatchingObjective(SHIFTED, timestep_sampling=sampling, logit_mean=0.3, logit_std=0.8)
    torch.manual_seed(7)
    batch = objective(latents)
    noise, timesteps, sigmas, noisy = reference(latents, sampling, 7, logit_mean=0.3, logit_std=0.8)
    assert torch.equal(batch.timesteps, timesteps)
    torch.testing.assert_close(batch.sigmas.flatten(), sigmas, rtol=0, atol=0)
    torch.testing.assert_close(batch.noisy_latents, noisy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch.target, noise - latents, rtol=0, atol=0)
    assert torch.equal(batch.loss_weights, torch.ones(6))
    assert ((sigmas > 0) & (sigmas <= 1)).all()


def test_logit_normal_concentrates_on_middle_noise_levels():
    objective = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler().config, timestep_sampling="logit_normal")
    torch.manual_seed(0)
    sigmas = objective(torch.zeros(4000, 1, 1, 1)).sigmas.flatten()
    middle, ends = ((sigmas > 0.25) & (sigmas < 0.75)).float().mean(), ((sigmas < 0.05) | (sigmas > 0.95)).float().mean()
    assert middle > 0.6 and ends < 0.05, (middle, ends)


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weights_follow_the_sd3_schemes(weighting):
    objective = FlowMatchingObjective(SHIFTED, loss_weighting=weighting)
    torch.manual_seed(3)
    batch = objective(torch.randn(5, 4, 2, 2))
    s = batch.sigmas.flatten()
    expected = s ** -2 if weighting == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    torch.testing.assert_close(batch.loss_weights, expected.float())


def test_preconditioned_outputs_estimate_the_clean_latents():
    latents = torch.randn(3, 4, 4, 4)
    objective = FlowMatchingObjective(SHIFTED, precondition_outputs=True)
    torch.manual_seed(5)
    batch = objective(latents)
    assert torch.equal(batch.target, latents)
    perfect_velocity = (batch.noisy_latents - latents) / batch.sigmas  # = noise - latents
    torch.testing.assert_close(objective.output(perfect_velocity, batch), latents, rtol=1e-5, atol=1e-5)
    plain = FlowMatchingObjective(SHIFTED)
    assert plain.output(perfect_velocity, batch) is perfect_velocity


def test_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="logit_normal"):
        FlowMatchingObjective(SHIFTED, timestep_sampling="lognorm")
    with pytest.raises(ValueError, match="cosmap"):
        FlowMatchingObjective(SHIFTED, loss_weighting="snr")
