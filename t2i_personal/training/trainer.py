"""The training loop. It knows losses only through ``Method.loss_terms`` and parameters only through
``Method.trainable_parameters``; everything specific to a paper lives in ``t2i_personal/methods``.

Reproducibility: the data stream, the noise, the timesteps and any dropout of micro-step ``m`` are derived from
``(seed, m, process)``, so stopping after a checkpoint and resuming replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..atomic import move_contents, publish_dir, write_json_atomic, write_text_atomic
from ..config import TrainConfig
from ..record import RECORD_NAME, make_record
from ..data.captions import render_for_concepts
from ..data.concepts import (ConceptDataset, Example, StreamBatchSampler, class_prompt, collate,
                             load_instance_examples, rescale_prompt_variants)
from ..data.images import ImageTransform, load_image_folder, make_image_grid, save_image_atomic
from ..data.priors import default_class_dir, ensure_class_images
from ..errors import ConfigError
from ..inference.sampling import generate
from ..methods import Conditioning, TrainStep, build_method, denoise
from ..models.components import Components, sdxl_time_ids
from ..models.loading import load_components
from . import checkpoint as ckpt
from . import run_folder

logger = logging.getLogger(__name__)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def micro_step_seed(seed: int, micro_step: int, rank: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + rank) % (2**63 - 1)


@dataclass
class _Run:
    """The state of one training run, fixed once training starts."""

    components: Components
    method: object
    wrapped: dict  # trained modules as accelerate prepared them (DDP-wrapped on several GPUs)
    noise_scheduler: object
    prediction_type: str
    prompt_ids: list[torch.Tensor]
    latent_cache: dict | None
    text_cache: tuple | None
    accelerator: Accelerator
    vae_dtype: torch.dtype
    weight_dtype: torch.dtype
    dataset: ConceptDataset
    optimizer: object
    lr_scheduler: object
    trainable: list[torch.nn.Parameter]
    validation_prompts: list[str]
    resume_from: Path | None


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.training.output_dir)
        # Set from another thread or a signal handler (Ctrl-C, the demo's Cancel): the loop finishes its step,
        # saves a resumable checkpoint and returns.
        self.stop_requested = threading.Event()
        launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if "mixed_precision" not in config.training.model_fields_set and launcher_precision:
            # `accelerate config` / `accelerate launch --mixed_precision` decide unless the YAML says otherwise
            config.training.mixed_precision = launcher_precision

    # ------------------------------------------------------------------ setup

    def _check_output_dir(self) -> Path | None:
        """Refuse an output folder this run may not write into; the checkpoint to resume from, if any."""
        t = self.config.training
        run_folder.check_output_dir(t.output_dir, t.resume)
        resume_from = ckpt.resolve_resume(self.output_dir, t.resume)
        if resume_from is not None:
            ckpt.check_checkpoint_readable(resume_from)
        return resume_from

    def _setup_accelerator(self) -> Accelerator:
        t = self.config.training
        report = None if t.report_to == "none" else t.report_to
        # accelerate keeps mixed precision in a process-wide singleton; the demo and tests train several times in
        # one process, so forget the previous run's choice (the distributed state itself is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        # SDXL conditions on text_encoder's penultimate layer, so its last layer gets no gradient: DDP must allow it
        text_side = self.config.method.train_text_encoder or any(c.initializer_token for c in self.config.concepts)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=text_side)
        accelerator = Accelerator(
            mixed_precision=t.mixed_precision, log_with=report, kwargs_handlers=[ddp],
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        if t.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        return accelerator

    def _prior_examples(self, components: Components, instances: list[Example], accelerator) -> list[list[Example]] | None:
        cfg, d = self.config, self.config.data
        if cfg.method.prior == "none":
            return None
        groups = []
        for ci, concept in enumerate(cfg.concepts):
            prompt = class_prompt(concept)
            if cfg.method.prior == "base_prediction":
                groups.append([Example(e.image, e.path, prompt, ci, True) for e in instances if e.concept == ci])
                continue
            if cfg.method.prior == "auxiliary":  # the user's images as they are: never generated, all of them used
                loaded = load_image_folder(concept.class_dir, what=f"auxiliary images of concept '{concept.identifier}'",
                                           max_pixels=d.max_image_pixels)
                groups.append([Example(img, path, prompt, ci, True) for path, img in loaded])
                continue
            folder = Path(concept.class_dir) if concept.class_dir else default_class_dir(
                components.source, prompt, d.resolution, d.class_generation_steps, d.class_generation_guidance,
                revision=cfg.model.revision, variant=cfg.model.variant, seed=cfg.training.seed)
            made = ensure_class_images(
                components.pipeline, folder, prompt, concept.num_class_images, resolution=d.resolution,
                steps=d.class_generation_steps, guidance=d.class_generation_guidance,
                batch_size=d.class_generation_batch_size, seed=cfg.training.seed, device=accelerator.device,
                autocast_dtype=None if cfg.training.mixed_precision == "no" else DTYPES[cfg.training.mixed_precision],
                rank=accelerator.process_index, world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone)
            if made:
                logger.info("generated %d class images for %r in %s", made, prompt, folder)
            loaded = load_image_folder(folder, what=f"class images of concept '{concept.identifier}'", max_pixels=d.max_image_pixels)
            groups.append([Example(img, path, prompt, ci, True) for path, img in loaded[: concept.num_class_images]])
        return groups

    def _place(self, components: Components, method, accelerator, weight_dtype) -> None:
        device = accelerator.device
        t = self.config.training
        vae_dtype = torch.float32 if (components.family == "sdxl" and weight_dtype == torch.float16) else weight_dtype
        modules = {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder,
                   "text_encoder_2": components.text_encoder_2}
        for name, module in modules.items():
            if module is None:
                continue
            if name in method.trained:
                # Trainable tensors are float32 (mixed precision autocasts); frozen ones (LoRA's base) are cast.
                module.to(device)
                for p in module.parameters():
                    p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
            else:
                _move(module, device, vae_dtype if name == "vae" else weight_dtype)
        for module in method.frozen_modules():
            _move(module, device, weight_dtype)
        if t.gradient_checkpointing:
            if "unet" in method.trained:
                components.unet.enable_gradient_checkpointing()
            for name in ("text_encoder", "text_encoder_2"):
                if name in method.trained:
                    # non-reentrant: with frozen embeddings the reentrant variant would give LoRA no gradient
                    getattr(components, name).gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
        self._set_attention(components, accelerator)

    def _check_optional_dependencies(self) -> None:
        """Fail before anything is written when an option needs a package that is not installed."""
        t = self.config.training
        if t.attention == "xformers" and not _importable("xformers"):
            raise ConfigError("training.attention is 'xformers' but xformers is not installed: "
                              "pip install 't2i-personal[xformers]' (CUDA only), or use attention: sdpa")
        if t.optimizer == "adamw_8bit" and not _importable("bitsandbytes"):
            raise ConfigError("training.optimizer is 'adamw_8bit' but bitsandbytes is not installed: "
                              "pip install 't2i-personal[bnb]', or use optimizer: adamw")
        if t.mixed_precision == "fp16" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            raise ConfigError("training.mixed_precision is 'fp16', which needs a GPU; on a CPU use bf16 or no")
        if t.report_to == "wandb" and not _importable("wandb"):
            raise ConfigError("training.report_to is 'wandb' but wandb is not installed: pip install wandb, "
                              "or use report_to: tensorboard")

    def _set_attention(self, components: Components, accelerator) -> None:
        choice = self.config.training.attention
        if choice == "xformers" or (choice == "auto" and _importable("xformers") and accelerator.device.type == "cuda"):
            components.unet.enable_xformers_memory_efficient_attention()
        # otherwise diffusers' default processors already use torch's scaled_dot_product_attention

    def _optimizer(self, param_groups: list[dict]):
        t = self.config.training
        kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
        eight_bit = t.optimizer == "adamw_8bit" or (t.optimizer == "adamw_8bit_if_available" and _importable("bitsandbytes"))
        if t.optimizer == "adamw_8bit_if_available" and not eight_bit:
            logger.warning("bitsandbytes is not installed: training with 32-bit AdamW (pip install 't2i-personal[bnb]' "
                           "for 8-bit AdamW, about 4x less optimizer memory)")
        if eight_bit:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(param_groups, **kwargs)
        # The fused kernel (CPU and CUDA) updates every tensor in one pass instead of a Python loop. Not under fp16:
        # there it hides skipped (overflow) steps from accelerate, so the LR schedule would advance anyway.
        if t.mixed_precision != "fp16":
            try:
                return torch.optim.AdamW(param_groups, **kwargs, fused=True)
            except RuntimeError:
                pass
        return torch.optim.AdamW(param_groups, **kwargs)

    # ------------------------------------------------------------------ caches

    @torch.no_grad()
    def _cache_latents(self, components, dataset: ConceptDataset, accelerator, vae_dtype) -> dict:
        """(mean, std) of the VAE posterior per (example, flipped); sampling stays per step as without caching."""
        cache, flips = {}, (False, True) if self.config.data.random_flip else (False,)
        transform = dataset.transform
        import random

        for key in tqdm(dataset.example_keys(), desc="caching latents", disable=not accelerator.is_local_main_process):
            ex = dataset.example(key)
            pixels = transform(ex.image, random.Random(0)).pixels  # center crop: deterministic
            for flipped in flips:
                px = pixels.flip(-1) if flipped else pixels
                dist = components.vae.encode(px[None].to(accelerator.device, vae_dtype)).latent_dist
                cache[(key, flipped)] = (dist.mean[0], dist.std[0])
        return cache

    # ------------------------------------------------------------------ run

    def train(self) -> Path:
        """Run (or resume) training; return the output folder."""
        self._lock = None
        try:
            return self._train()
        finally:
            run_folder.release(self._lock)

    def _train(self) -> Path:
        run = self._prepare()
        t, accelerator = self.config.training, run.accelerator
        global_step = self._resume(run)
        if accelerator.is_main_process and t.report_to != "none":
            flat = {k: str(v) if isinstance(v, list) else v for k, v in ckpt.flatten(self.config.model_dump(mode="json")).items()
                    if v is not None}
            accelerator.init_trackers("t2i-personal", config=flat)
        global_step = self._loop(run, global_step)
        if global_step < t.max_train_steps:
            logger.info("stopped after step %d; resume with training.resume=latest", global_step)
        else:
            if run.validation_prompts:
                self._validate(run.components, run.validation_prompts, accelerator, run.weight_dtype, global_step)
            if accelerator.is_main_process:
                self._export_final(run.components, run.method, global_step)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return self.output_dir

    def _prepare(self) -> "_Run":
        """Everything before the first step. Inputs are validated before anything is written."""
        cfg, t, d = self.config, self.config.training, self.config.data
        resume_from = self._check_output_dir()
        accelerator = self._setup_accelerator()
        if resume_from is not None:
            ckpt.check_resume_config(resume_from, cfg, accelerator.num_processes)
        self._check_optional_dependencies()
        instances = load_instance_examples(cfg.concepts, d.max_image_pixels)  # bad images fail before any output
        weight_dtype = DTYPES[t.mixed_precision]
        components = load_components(cfg.model, dtype=torch.float32)  # master weights; mixed precision casts later
        method = build_method(cfg.method, cfg.concepts)
        method.check(components)  # e.g. an identifier to learn that is already a word: before class images
        base_prediction_type = components.scheduler.config.prediction_type
        if t.prediction_type and t.prediction_type != base_prediction_type and cfg.method.prior == "base_prediction":
            raise ConfigError(f"method.prior 'base_prediction' takes the base model's {base_prediction_type} output as the "
                              f"target, which contradicts training.prediction_type '{t.prediction_type}'; use "
                              "prior: class_images or drop the override")
        priors = self._prior_examples(components, instances, accelerator)  # sampled by the base model, as it is
        if t.prediction_type:  # validation and exports must sample with what the UNet learns
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config,
                                                                          prediction_type=t.prediction_type)
        method.add_tokens(components)  # learned identifiers must be in the vocabulary before prompts are tokenized
        prompts = {e.prompt for e in instances} | {e.prompt for group in (priors or []) for e in group}
        if d.rescale_augmentation:  # instance prompts may get a "far away" / "zoomed in" prefix
            prompts |= set(rescale_prompt_variants({e.prompt for e in instances}))
        prompts = sorted(prompts)
        prompt_ids = components.tokenize(prompts)  # raises on prompts longer than the encoder's window
        validation_prompts = [render_for_concepts(p, cfg.concepts) for p in cfg.validation.prompts]
        components.tokenize(validation_prompts)

        torch.manual_seed(t.seed)  # adapter initialisation must not depend on what ran before (e.g. class images)
        method.prepare(components)
        self.components, self.method = components, method  # kept for callers (tests, the demo) after train()

        accelerator.wait_for_everyone()  # every rank has checked the output folder before the first write to it
        if accelerator.is_main_process:
            self._lock = run_folder.claim(self.output_dir)
            run_folder.remove_leftovers(self.output_dir)
            write_text_atomic(self.output_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self._place(components, method, accelerator, weight_dtype)
        vae_dtype = next(components.vae.parameters()).dtype
        transform = ImageTransform(d.resolution, d.center_crop, d.random_flip, rescale=d.rescale_augmentation,
                                   vae_scale_factor=components.vae_scale_factor)
        dataset = ConceptDataset(instances, priors, transform,
                                 {p: i for i, p in enumerate(prompts)}, t.seed, with_pixels=not t.cache_latents)
        latent_cache = self._cache_latents(components, dataset, accelerator, vae_dtype) if t.cache_latents else None
        with torch.no_grad():
            text_cache = components.encode(prompt_ids) if t.cache_text_embeddings else None

        scale = t.train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes if t.scale_lr else 1
        lr, te_lr = t.learning_rate * scale, (t.text_encoder_learning_rate or t.learning_rate) * scale
        token_lr = t.token_learning_rate * scale if t.token_learning_rate else None
        groups = method.trainable_parameters(components, lr, te_lr, token_lr)
        for g in groups:
            n = sum(p.numel() for p in g["params"])
            logger.info("training %s: %d tensors, %s parameters, lr %g", g["name"], len(g["params"]), f"{n:,}", g["lr"])
        optimizer = self._optimizer([{k: v for k, v in g.items() if k != "name"} for g in groups])
        lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=t.max_train_steps * accelerator.num_processes, num_cycles=t.lr_num_cycles, power=t.lr_power)
        prepared = accelerator.prepare(*[getattr(components, n) for n in method.trained], optimizer, lr_scheduler)
        wrapped = dict(zip(method.trained, prepared[: len(method.trained)]))
        self.optimizer, lr_scheduler = prepared[len(method.trained):]
        # Checkpoints hold the trainable tensors only (trainable.safetensors), not accelerate's full model copies.
        accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())
        self._run = _Run(components, method, wrapped, components.noise_scheduler(), components.scheduler.config.prediction_type,
                         prompt_ids, latent_cache, text_cache, accelerator, vae_dtype, weight_dtype, dataset,
                         self.optimizer, lr_scheduler, [p for g in groups for p in g["params"]], validation_prompts,
                         resume_from)
        return self._run

    def _resume(self, run: "_Run") -> int:
        if run.resume_from is None:
            return 0
        try:
            run.accelerator.load_state(str(run.resume_from))
            run.method.load_trainable_state_dict(run.components, load_file(str(run.resume_from / "trainable.safetensors")))
        except Exception as exc:  # noqa: BLE001 -- a truncated optimizer state, a mismatched tensor, ...
            raise ckpt.damaged_checkpoint(run.resume_from, exc) from exc
        step = ckpt.read_checkpoint_state(run.resume_from)["global_step"]
        logger.info("resumed from %s at step %d", run.resume_from, step)
        return step

    def request_stop(self) -> None:
        """Stop after the current step with a resumable checkpoint (``training.resume=latest`` continues)."""
        self.stop_requested.set()

    def _progress_log(self, global_step: int, main_process: bool):
        """``logs/progress.jsonl``: one JSON line per step (loss terms, lr, seconds) and per validation grid, for
        live views (the demo's loss plot). On resume, lines after the resumed step are dropped first."""
        path = self.output_dir / "logs" / "progress.jsonl"
        if not main_process:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if global_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= global_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        return path.open("a", buffering=1)

    def _loop(self, run: "_Run", global_step: int) -> int:
        """Optimizer steps until max_train_steps (or stop_after_step); returns the last step done."""
        t, d, accelerator = self.config.training, self.config.data, run.accelerator
        accum = t.gradient_accumulation_steps
        sampler = StreamBatchSampler(len(run.dataset), t.train_batch_size, t.seed, start=global_step * accum,
                                     num_processes=accelerator.num_processes, rank=accelerator.process_index)
        batches = iter(torch.utils.data.DataLoader(run.dataset, batch_sampler=sampler, collate_fn=collate,
                                                   num_workers=d.num_workers, persistent_workers=d.num_workers > 0))
        for module in run.wrapped.values():
            module.train()
        stop_at = t.stop_after_step or t.max_train_steps
        bar = tqdm(total=t.max_train_steps, initial=global_step, desc="training", unit="step",
                   disable=not (t.progress_bar and accelerator.is_local_main_process))
        self.step_seconds: list[float] = []  # per optimizer step (loss.item() synchronises), for benchmarks
        log_file = self._progress_log(global_step, accelerator.is_main_process)
        try:
            global_step = self._steps(run, global_step, stop_at, batches, bar, log_file)
        finally:
            if log_file is not None:
                log_file.close()
        bar.close()
        return global_step

    def _steps(self, run: "_Run", global_step: int, stop_at: int, batches, bar, log_file) -> int:
        t, accelerator, accum = self.config.training, run.accelerator, self.config.training.gradient_accumulation_steps
        while global_step < stop_at:
            started, logs = time.perf_counter(), {}
            for micro in range(accum):
                batch = next(batches)
                torch.manual_seed(micro_step_seed(t.seed, global_step * accum + micro, accelerator.process_index))
                with ExitStack() as no_sync:
                    if micro < accum - 1:  # gradients are all-reduced once, on the last micro-batch
                        for module in run.wrapped.values():
                            no_sync.enter_context(accelerator.no_sync(module))
                    terms = self._micro_step(batch)
                    accelerator.backward(sum(terms.values()) / accum)
                for k, v in terms.items():
                    logs[k] = logs.get(k, 0.0) + v.detach().item() / accum
            if t.max_grad_norm is not None:
                self._clip_gradients(accelerator, run.trainable, t.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            global_step += 1
            self.step_seconds.append(time.perf_counter() - started)
            logs = {**logs, "loss": sum(logs.values()), "lr": run.lr_scheduler.get_last_lr()[0]}
            self.last_logs = logs
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if t.report_to != "none":
                accelerator.log(logs, step=global_step)
            if log_file is not None:
                log_file.write(json.dumps({"step": global_step, **logs, "seconds": self.step_seconds[-1]}) + "\n")
            if global_step >= t.max_train_steps:
                # always resumable from the end (to train on later); the final export is its inference artifact
                self._save_checkpoint(run.components, run.method, accelerator, global_step, with_artifact=False)
                break
            if run.validation_prompts and global_step % self.config.validation.every_n_steps == 0:
                grid = self._validate(run.components, run.validation_prompts, accelerator, run.weight_dtype, global_step)
                if log_file is not None:
                    log_file.write(json.dumps({"step": global_step, "validation": str(grid)}) + "\n")
            stopping = self.stop_requested.is_set()
            if accelerator.num_processes > 1:  # every rank must stop at the same step, or the checkpoint's collectives hang
                stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device), "max").item())
            if global_step % t.checkpointing_steps == 0 or global_step == stop_at or stopping:
                self._save_checkpoint(run.components, run.method, accelerator, global_step)
            if stopping:
                logger.info("stop requested: checkpoint saved at step %d", global_step)
                break
        return global_step

    def _micro_step(self, batch) -> dict[str, torch.Tensor]:
        """One forward pass: latents, noise, timesteps, conditioning, prediction; the method turns it into loss terms."""
        st, t = self._run, self.config.training
        components, method, wrapped, noise_scheduler = st.components, st.method, st.wrapped, st.noise_scheduler
        accelerator, device, prediction_type = st.accelerator, st.accelerator.device, st.prediction_type
        latent_cache, text_cache, prompt_ids = st.latent_cache, st.text_cache, st.prompt_ids
        with torch.no_grad():
            if latent_cache is not None:
                means, stds = zip(*(latent_cache[(k, f)] for k, f in zip(batch["key"], batch["flipped"])))
                mean, std = torch.stack(means), torch.stack(stds)
                latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
            else:
                latents = components.vae.encode(batch["pixels"].to(device, st.vae_dtype)).latent_dist.sample()
            latents = latents.float() * components.vae.config.scaling_factor
        bsz = latents.shape[0]
        # randn_like would follow the memory layout of a (non-contiguous) VAE posterior and draw differently
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn(bsz, latents.shape[1], 1, 1, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)

        index = torch.tensor(batch["prompt"])
        input_ids = [ids[index] for ids in prompt_ids]
        if text_cache is not None:
            hidden, pooled = text_cache[0][index.to(text_cache[0].device)], (
                None if text_cache[1] is None else text_cache[1][index.to(text_cache[1].device)])
        else:
            encoders = [wrapped.get(n, getattr(components, n)) for n in ("text_encoder", "text_encoder_2")
                        if getattr(components, n) is not None]
            with nullcontext() if any(n.startswith("text_encoder") for n in method.trained) else torch.no_grad():
                hidden, pooled = components.encode(input_ids, encoders)
        time_ids = None
        if components.family == "sdxl":
            res = self.config.data.resolution
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], [(res, res)] * bsz, hidden.dtype, device)
        cond = Conditioning(hidden, pooled, time_ids)

        unet = wrapped.get("unet", components.unet)
        with accelerator.autocast():
            model_pred = denoise(unet, noisy, timesteps, cond)
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        if t.snr_gamma is not None:
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=t.snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        else:
            weights = torch.ones(bsz, device=device)
        loss_mask = batch.get("mask")
        if loss_mask is not None:  # data.rescale_augmentation: [B, 1, h, w] at latent resolution
            if loss_mask.shape[-2:] != latents.shape[-2:]:
                raise RuntimeError(f"loss mask {tuple(loss_mask.shape[-2:])} does not match the latents "
                                   f"{tuple(latents.shape[-2:])}")
            loss_mask = loss_mask.to(device)
        step = TrainStep(model_pred=model_pred, target=target, noisy_latents=noisy, timesteps=timesteps, cond=cond,
                         input_ids=input_ids, is_prior=batch["is_prior"].to(device), loss_weights=weights,
                         loss_mask=loss_mask)
        with accelerator.autocast():
            return method.loss_terms(step, components)

    @staticmethod
    def _clip_gradients(accelerator, params, max_norm: float) -> None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            accelerator.unscale_gradients()
            # foreach=True also on CPU, where torch's default falls back to one norm per tensor
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        else:  # DeepSpeed / FSDP own the clipping
            accelerator.clip_grad_norm_(params, max_norm)

    # ------------------------------------------------------------------ outputs

    @torch.no_grad()
    def _validate(self, components, prompts, accelerator, weight_dtype, step) -> Path | None:
        if not accelerator.is_main_process:
            return None
        v, res = self.config.validation, self.config.data.resolution
        pipe = components.pipeline()
        pipe.set_progress_bar_config(disable=True)
        modes = {m: m.training for m in (components.unet, *components.text_encoders)}
        for m in modes:
            m.eval()  # no (LoRA) dropout while sampling
        images = []
        try:
            for i, prompt in enumerate(prompts):
                generators = [torch.Generator().manual_seed(v.seed + i * 1000 + j) for j in range(v.num_images_per_prompt)]
                images += generate(pipe, [prompt] * v.num_images_per_prompt, generators=generators,
                                   autocast_dtype=None if weight_dtype == torch.float32 else weight_dtype,
                                   negative_prompt=None if v.negative_prompt is None else [v.negative_prompt] * len(generators),
                                   num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                                   height=res, width=res)
        finally:
            for m, was_training in modes.items():
                m.train(was_training)
        grid = make_image_grid(images, rows=len(prompts))
        path = save_image_atomic(grid, self.output_dir / "validation" / f"step-{step:06d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in
                                            zip(images, [p for p in prompts for _ in range(v.num_images_per_prompt)])]})
        return path

    def _export_view(self, components: Components, method) -> Components:
        """Components as they should be exported: modules the export reads that were cast for mixed precision but
        not trained are replaced by float32 copies of the base (loaded once, kept on the CPU), so exports never
        hold degraded weights."""
        # A text encoder that only holds learned token rows is frozen apart from them: it is exported from the
        # float32 base with those rows put in.
        cast = [n for n in method.exported_components() if getattr(components, n) is not None
                and n not in method.own and any(p.dtype != torch.float32 for p in getattr(components, n).parameters())]
        if not cast:
            return components
        if not hasattr(self, "_pristine"):
            base = load_components(self.config.model, dtype=torch.float32)
            self._pristine = {n: getattr(base, n) for n in cast}
        for name in cast:
            if name in method.trained:
                method.tokens.transplant(getattr(components, name), self._pristine[name])
        return Components(**{**components.__dict__, **self._pristine})

    def _write_artifact(self, components, method, folder: Path, step: int) -> None:
        artifact = method.save(self._export_view(components, method), folder, self.config.export)
        write_json_atomic(folder / RECORD_NAME, make_record(self.config, artifact, components.family, step))

    def _save_checkpoint(self, components, method, accelerator, step: int, with_artifact: bool = True) -> None:
        final = ckpt.checkpoint_dir(self.output_dir, step)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-")) if accelerator.is_main_process else None
        tmp = Path(accelerator.gather_for_metrics([str(tmp)])[0]) if accelerator.num_processes > 1 else tmp
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank has written its part before the folder is published
        if accelerator.is_main_process:
            state = {k: v.detach().to("cpu").contiguous() for k, v in method.trainable_state_dict(components).items()}
            save_file(state, str(tmp / "trainable.safetensors"))
            if with_artifact and self.config.export.inference_artifact_in_checkpoints:
                self._write_artifact(components, method, tmp / "inference", step)
            write_json_atomic(tmp / "trainer_state.json", {"global_step": step, "num_processes": accelerator.num_processes,
                                                                "config": self.config.model_dump(mode="json")})
            publish_dir(tmp, final)
            ckpt.prune_checkpoints(self.output_dir, self.config.training.checkpoints_total_limit)
            run_folder.remove_leftovers(self.output_dir)
        accelerator.wait_for_everyone()

    def _export_final(self, components, method, step: int) -> None:
        tmp = Path(tempfile.mkdtemp(dir=self.output_dir, prefix=".final-"))
        try:
            artifact = method.save(self._export_view(components, method), tmp, self.config.export)
            move_contents(tmp, self.output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Written last: its presence is what marks the output folder as complete.
        write_json_atomic(self.output_dir / RECORD_NAME, make_record(self.config, artifact, components.family, step))


def _move(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    # Only cast when needed: diffusers warns on (and some models special-case) explicit dtype casts.
    if next(module.parameters()).dtype == dtype:
        module.to(device)
    else:
        module.to(device, dtype=dtype)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def train(config: TrainConfig) -> Path:
    return Trainer(config).train()


@contextmanager
def stop_on_signals(trainer: Trainer, signals=(signal.SIGINT, signal.SIGTERM)):
    """The first Ctrl-C / SIGTERM asks ``trainer`` to stop after its current step with a resumable checkpoint; a
    second one aborts at once (the default behaviour)."""
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handle(signum, frame):
        if trainer.stop_requested.is_set():
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        logger.warning("stopping after this step with a checkpoint (send the signal again to abort at once)")
        trainer.request_stop()

    for sig in signals:
        signal.signal(sig, handle)
    try:
        yield trainer
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
