"""The step loop, read top to bottom as a diffusers training example: per optimizer step, for each micro-batch,
encode the images to latents, let the model family noise them and name the target, condition on the prompts,
predict, and let the method turn the prediction into loss terms; then clip, step, log, validate, checkpoint.

Reproducibility: the data stream, the noise, the timesteps and any dropout of micro-step ``m`` are derived from
``(seed, m, process)``, so stopping after a checkpoint and resuming replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import ExitStack

import torch
from tqdm.auto import tqdm

from ..data.buckets import BucketBatchSampler
from ..data.concepts import StreamBatchSampler, collate
from ..methods import TrainStep
from . import outputs
from .setup import Run

logger = logging.getLogger(__name__)


def micro_step_seed(seed: int, micro_step: int, rank: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + rank) % (2**63 - 1)


def train_steps(run: Run, trainer, global_step: int) -> int:
    """Optimizer steps until max_train_steps (or stop_after_step, or a stop request); returns the last step."""
    t, accelerator = run.config.training, run.accelerator
    accum = t.gradient_accumulation_steps
    if run.dataset.sizes is not None:  # data.buckets: every micro-batch holds one bucket
        sampler = BucketBatchSampler(run.dataset.item_sizes(), t.train_batch_size, t.seed, start=global_step * accum,
                                     num_processes=accelerator.num_processes, rank=accelerator.process_index)
    else:
        sampler = StreamBatchSampler(len(run.dataset), t.train_batch_size, t.seed, start=global_step * accum,
                                     num_processes=accelerator.num_processes, rank=accelerator.process_index)
    batches = iter(torch.utils.data.DataLoader(run.dataset, batch_sampler=sampler, collate_fn=collate,
                                               num_workers=run.config.data.num_workers,
                                               persistent_workers=run.config.data.num_workers > 0))
    for module in run.wrapped.values():
        module.train()
    stop_at = t.stop_after_step or t.max_train_steps
    bar = tqdm(total=t.max_train_steps, initial=global_step, desc="training", unit="step",
               disable=not (t.progress_bar and accelerator.is_local_main_process))
    log_file = outputs.open_progress_log(run.output_dir, global_step) if accelerator.is_main_process else None
    try:
        while global_step < stop_at:
            started = time.perf_counter()
            logs = optimizer_step(run, global_step, batches)
            global_step += 1
            trainer.step_seconds.append(time.perf_counter() - started)
            trainer.last_logs = logs
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if t.report_to != "none":
                accelerator.log(logs, step=global_step)
            if log_file is not None:
                log_file.write(json.dumps({"step": global_step, **logs, "seconds": trainer.step_seconds[-1]}) + "\n")
            if after_step(run, trainer, global_step, stop_at, log_file):
                break
    finally:
        if log_file is not None:
            log_file.close()
        bar.close()
    return global_step


def optimizer_step(run: Run, global_step: int, batches) -> dict[str, float]:
    """Accumulate the micro-batches' gradients, clip, step; the logged loss terms, ``loss`` and ``lr``."""
    t, accelerator, accum = run.config.training, run.accelerator, run.config.training.gradient_accumulation_steps
    logs: dict[str, float] = {}
    for micro in range(accum):
        batch = next(batches)
        torch.manual_seed(micro_step_seed(t.seed, global_step * accum + micro, accelerator.process_index))
        with ExitStack() as no_sync:
            if micro < accum - 1:  # gradients are all-reduced once, on the last micro-batch
                for module in run.wrapped.values():
                    no_sync.enter_context(accelerator.no_sync(module))
            terms = micro_step(run, batch)
            accelerator.backward(sum(terms.values()) / accum)
        for k, v in terms.items():
            logs[k] = logs.get(k, 0.0) + v.detach().item() / accum
    grad_norm = clip_gradients(accelerator, run.trainable, t.max_grad_norm)
    if not finite_step(run, logs, grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        skip_nonfinite_step(run, global_step + 1, logs)
        return {**logs, "loss": sum(logs.values()), "lr": run.lr_scheduler.get_last_lr()[0], "skipped": 1.0}
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(global_step + 1)
    return {**logs, "loss": sum(logs.values()), "lr": run.lr_scheduler.get_last_lr()[0]}


def finite_step(run: Run, logs: dict[str, float], grad_norm: torch.Tensor | None) -> bool:
    """Whether every loss term and the gradient norm are finite, on every process. Under fp16 an inf gradient is
    the loss scaler's business (it skips the step and lowers the scale), so only the loss counts there."""
    finite = all(math.isfinite(v) for v in logs.values())
    if grad_norm is not None and run.config.training.mixed_precision != "fp16":
        finite = finite and bool(torch.isfinite(grad_norm).all())
    accelerator = run.accelerator
    if accelerator.num_processes > 1:  # every rank must skip the same steps
        bad = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
        finite = not bool(accelerator.reduce(bad, "max").item())
    return finite


def skip_nonfinite_step(run: Run, step: int, logs: dict[str, float]) -> None:
    """Count a skipped step; past ``training.max_nonfinite_steps`` stop with what to try."""
    from ..errors import TrainingDiverged

    t = run.config.training
    run.nonfinite_steps += 1
    terms = ", ".join(f"{k} {v:.4g}" for k, v in logs.items())
    logger.warning("step %d skipped: the loss or its gradients are not finite (%s); %d skipped so far", step, terms,
                   run.nonfinite_steps)
    if run.nonfinite_steps > t.max_nonfinite_steps:
        from . import checkpoint as ckpt

        latest = (ckpt.list_checkpoints(run.output_dir) or [None])[-1]
        raise TrainingDiverged(
            f"training stopped at step {step}: the loss or its gradients were NaN/inf ({terms}) on "
            f"{run.nonfinite_steps} steps (training.max_nonfinite_steps = {t.max_nonfinite_steps}); the weights were "
            f"never updated with them, and the latest checkpoint ({latest or 'none yet'}) holds the last good ones. "
            f"Try mixed_precision: bf16 instead of fp16, a lower learning rate (now {t.learning_rate:g}), or "
            "max_grad_norm: 1.0; then resume with training.resume=latest.")


def micro_step(run: Run, batch) -> dict[str, torch.Tensor]:
    """One forward pass: latents, noise, timesteps, conditioning, prediction; the method turns it into loss terms."""
    components, family, device = run.components, run.components.family, run.accelerator.device
    latents = encode_latents(run, batch)
    noised = run.objective(latents)  # noisy input, timesteps, target and per-sample weights: the family's objective

    index = torch.tensor(batch["prompt"])
    input_ids = [ids[index] for ids in run.prompt_ids]
    if run.text_cache is not None:
        cond = run.text_cache.select(index)
    else:
        encoders = [run.wrapped.get(n, getattr(components, n)) for n in components.text_encoder_names]
        if any(n.startswith("text_encoder") for n in run.method.trained):
            cond = components.encode(input_ids, encoders)
        else:  # frozen encoders: each distinct prompt once (a batch repeats the instance prompt; T5 is costly)
            distinct, rows = torch.unique(index, return_inverse=True)
            with torch.no_grad():
                cond = components.encode([ids[distinct] for ids in run.prompt_ids], encoders).select(rows)
    width, height = batch["target"][0]  # one size per micro-batch: the square, or its bucket
    cond = family.add_image_conditioning(cond, batch["original_size"], batch["crop_top_left"], (height, width))
    if run.guidance is not None:
        cond = cond.replace(guidance=torch.full((latents.shape[0],), run.guidance, device=device))

    with run.accelerator.autocast():
        denoiser = run.wrapped.get(components.denoiser_name, components.denoiser)
        model_pred = family.denoise(denoiser, noised.noisy_latents, noised.timesteps, cond)
        model_pred = run.objective.output(model_pred, noised)
    step = TrainStep(model_pred=model_pred, target=noised.target, noisy_latents=noised.noisy_latents,
                     timesteps=noised.timesteps, cond=cond, input_ids=input_ids, is_prior=batch["is_prior"].to(device),
                     loss_weights=noised.loss_weights, loss_mask=loss_mask(batch, latents, device))
    with run.accelerator.autocast():
        return run.method.loss_terms(step, components)


@torch.no_grad()
def encode_latents(run: Run, batch) -> torch.Tensor:
    """A fresh sample of each image's VAE posterior (from the cache of means and stds when latents are cached)."""
    if run.latent_cache is not None:
        means, stds = zip(*(run.latent_cache[(k, f, tuple(size))]
                            for k, f, size in zip(batch["key"], batch["flipped"], batch["target"])))
        mean, std = torch.stack(means), torch.stack(stds)
        sample = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    else:
        pixels = batch["pixels"].to(run.accelerator.device, run.vae_dtype)
        sample = run.components.vae.encode(pixels).latent_dist.sample()
    return run.components.family.scale_latents(run.components.vae, sample)


def loss_mask(batch, latents: torch.Tensor, device) -> torch.Tensor | None:
    """The [B, 1, h, w] loss weights at latent resolution of ``data.rescale_augmentation`` or ``data.masks`` (None
    without either)."""
    mask = batch.get("mask")
    if mask is None:
        return None
    if mask.shape[-2:] != latents.shape[-2:]:
        raise RuntimeError(f"loss mask {tuple(mask.shape[-2:])} does not match the latents {tuple(latents.shape[-2:])}")
    return mask.to(device)


def after_step(run: Run, trainer, global_step: int, stop_at: int, log_file) -> bool:
    """Validation and checkpoints after an optimizer step; True when the loop must end here."""
    t, accelerator = run.config.training, run.accelerator
    if global_step >= t.max_train_steps:
        # always resumable from the end (to train on later); the final export is its inference artifact
        outputs.save_checkpoint(run, global_step, with_artifact=False)
        return True
    if run.validation_prompts and global_step % run.config.validation.every_n_steps == 0:
        with run.averaged():
            grid = outputs.validate(run.config, run.components, run.validation_prompts, accelerator, run.weight_dtype,
                                    global_step)
        if log_file is not None:
            log_file.write(json.dumps({"step": global_step, "validation": str(grid)}) + "\n")
    stopping = trainer.stop_requested.is_set()
    if accelerator.num_processes > 1:  # every rank must stop at the same step, or the checkpoint's collectives hang
        stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device), "max").item())
    if global_step % t.checkpointing_steps == 0 or global_step == stop_at or stopping:
        outputs.save_checkpoint(run, global_step)
    if stopping:
        logger.info("stop requested: checkpoint saved at step %d", global_step)
    return stopping


def clip_gradients(accelerator, params, max_norm: float | None) -> torch.Tensor | None:
    """Clip to ``max_norm`` (None: only measure); the total gradient norm before clipping (None where DeepSpeed /
    FSDP own the clipping and no limit is set)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        accelerator.unscale_gradients()
        grads = [p.grad for p in params if p.grad is not None]
        if max_norm is None:
            return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        # foreach=True also on CPU, where torch's default falls back to one norm per tensor
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if max_norm is None:  # DeepSpeed / FSDP own the clipping
        return None
    return accelerator.clip_grad_norm_(params, max_norm)
