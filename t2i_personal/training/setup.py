"""Everything a training run does before its first step, in order: refuse what cannot work (output folder,
resume, options, images, prompts) before anything is written, load the model, ask the method for its prior
examples and trainable parameters, place modules on the device, build the caches, the optimizer and the LR
schedule. The result is a :class:`Run`, fixed once training starts."""

from __future__ import annotations

import importlib.util
import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..atomic import write_text_atomic
from ..config import TrainConfig
from ..data.captions import render_for_concepts
from ..data.buckets import bucket_sizes
from ..data.concepts import ConceptDataset, Example, class_prompt, load_instance_examples, rescale_prompt_variants
from ..data.images import load_image_folder
from ..data.priors import default_class_dir, ensure_class_images
from ..data.transforms import ImageTransform
from ..errors import ConfigError
from ..families import Conditioning
from ..methods import LearningRates, Method, build_method
from ..models.components import Components
from ..models.loading import load_components
from ..models.quantize import check_quantization_available, quantize_frozen
from . import checkpoint as ckpt
from . import run_folder
from .ema import TrainableEMA
from .outputs import Float32Base, save_mask_sheet

logger = logging.getLogger(__name__)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    """The state of one training run."""

    config: TrainConfig
    output_dir: Path
    components: Components
    method: Method
    wrapped: dict  # trained modules as accelerate prepared them (DDP-wrapped on several GPUs)
    objective: object  # the family's training objective
    prompt_ids: list[torch.Tensor]
    latent_cache: dict | None
    text_cache: Conditioning | None
    accelerator: Accelerator
    vae_dtype: torch.dtype
    weight_dtype: torch.dtype
    dataset: ConceptDataset
    optimizer: object
    lr_scheduler: object
    trainable: list[torch.nn.Parameter]
    validation_prompts: list[str]
    resume_from: Path | None
    float32_base: object = None  # float32 base modules for exports (outputs.Float32Base)
    lock: object = None  # the run folder's lock, held while training
    guidance: float | None = None  # the embedded guidance a guidance-distilled denoiser trains with (FLUX.1-dev)
    nonfinite_steps: int = 0  # optimizer steps skipped so far because the loss or gradients were NaN/inf
    ema: TrainableEMA | None = None  # training.ema: the averaged trainable weights

    def averaged(self):
        """The EMA weights in the model for the duration (validation, exports), when training.ema is on."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    @property
    def resolved_settings(self) -> dict:
        """What the family's defaults resolved to (recorded in personalization.json beside the config)."""
        settings = {"objective": self.objective.describe(), "guidance_scale": self.guidance}
        if self.components.family.denoiser_name == "transformer":
            settings["max_sequence_length"] = self.components.family.max_sequence_length(self.components)
        return settings


def prepare_run(config: TrainConfig) -> Run:
    """Everything before the first step. Inputs are validated before anything is written."""
    cfg, t, d = config, config.training, config.data
    output_dir = Path(t.output_dir)
    run_folder.check_output_dir(t.output_dir, t.resume)
    resume_from = ckpt.resolve_resume(output_dir, t.resume)
    if resume_from is not None:
        ckpt.check_checkpoint_readable(resume_from)
    method = build_method(cfg.method, cfg.concepts)
    accelerator = _accelerator(cfg, output_dir, method)
    if resume_from is not None:
        ckpt.check_resume_config(resume_from, cfg, accelerator.num_processes)
    check_optional_dependencies(t)
    check_quantization_available(cfg.model.quantize)
    instances = load_instance_examples(cfg.concepts, d.max_image_pixels, d.masks)  # bad images fail before any output
    components = load_components(cfg.model, dtype=torch.float32)  # master weights; mixed precision casts later
    family = components.family
    family.check_training(t)
    family.check_resolution(components, d.resolution)
    if d.buckets and d.bucket_step and d.bucket_step % family.pixel_multiple(components):
        raise ConfigError(f"data.bucket_step {d.bucket_step} is not a multiple of {family.pixel_multiple(components)}, "
                          f"which image sides must be for this {family.name} model")
    if t.max_sequence_length:
        components.extras["max_sequence_length"] = t.max_sequence_length
    components.extras["tokens_in_t5"] = t.learn_tokens_in_t5
    objective = family.objective(components, t)  # refuses options of another family's objective
    guidance = family.training_guidance(components.denoiser, t)
    method.check(components, t)  # e.g. an identifier to learn that is already a word: before class images
    priors = method.prior_examples(instances, PriorImages(cfg, components, accelerator))  # by the base model, as it is
    if t.prediction_type:  # validation and exports must sample with what the denoiser learns
        components.scheduler = type(components.scheduler).from_config(components.scheduler.config,
                                                                      prediction_type=t.prediction_type)
    method.add_tokens(components)  # learned identifiers must be in the vocabulary before prompts are tokenized
    instance_prompts = {e.prompt for e in instances}
    if d.caption_dropout:  # captioned instances sometimes train with the bare instance prompt
        instance_prompts |= {e.bare_prompt for e in instances if e.bare_prompt}
    prompts = instance_prompts | {e.prompt for group in (priors or []) for e in group}
    if d.rescale_augmentation:  # instance prompts may get a "far away" / "zoomed in" prefix
        prompts |= set(rescale_prompt_variants(instance_prompts))
    prompts = sorted(prompts)
    prompt_ids = components.tokenize(prompts)  # raises on prompts longer than the encoder's window
    validation_prompts = [render_for_concepts(p, cfg.concepts) for p in cfg.validation.prompts]
    components.tokenize(validation_prompts)

    if cfg.model.quantize != "none":  # after class images (made by the base as it is), before LoRA wraps the layers
        n = quantize_frozen(components.denoiser, cfg.model.quantize, DTYPES[t.mixed_precision])
        logger.info("quantized %d linear layers of the %s to %s", n, components.denoiser_name, cfg.model.quantize)
    torch.manual_seed(t.seed)  # adapter initialisation must not depend on what ran before (e.g. class images)
    method.prepare(components)
    accelerator.wait_for_everyone()  # every rank has checked the output folder before the first write to it
    lock = None
    if accelerator.is_main_process:
        lock = run_folder.claim(output_dir)
        run_folder.remove_leftovers(output_dir)
        write_text_atomic(output_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        if resume_from is None:
            save_mask_sheet(cfg, instances, accelerator)
    weight_dtype = DTYPES[t.mixed_precision]
    place(cfg, components, method, accelerator, weight_dtype)
    vae_dtype = next(components.vae.parameters()).dtype
    transform = ImageTransform(d.resolution, d.center_crop, d.random_flip, rescale=d.rescale_augmentation,
                               vae_scale_factor=components.vae_scale_factor)
    buckets = bucket_sizes(d.resolution, d.bucket_step or default_bucket_step(d.resolution, family, components)) \
        if d.buckets else None
    dataset = ConceptDataset(instances, priors, transform, {p: i for i, p in enumerate(prompts)}, t.seed,
                             with_pixels=not t.cache_latents, caption_dropout=d.caption_dropout,
                             mask_background_weight=d.mask_background_weight, buckets=buckets)
    latent_cache = cache_latents(components, dataset, accelerator, vae_dtype, d.random_flip) if t.cache_latents else None
    with torch.no_grad():
        text_cache = components.encode(prompt_ids) if t.cache_text_embeddings else None
    if t.offload_text_encoders:
        for encoder in components.text_encoders:
            encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    scale = t.train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes if t.scale_lr else 1
    groups = method.trainable_parameters(components, LearningRates(**t.learning_rates(scale)))
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        logger.info("training %s: %d tensors, %s parameters, lr %g", g["name"], len(g["params"]), f"{n:,}", g["lr"])
    optimizer = make_optimizer(t, [{k: v for k, v in g.items() if k != "name"} for g in groups])
    lr_scheduler = get_scheduler(
        t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=t.max_train_steps * accelerator.num_processes, num_cycles=t.lr_num_cycles, power=t.lr_power)
    prepared = accelerator.prepare(*[getattr(components, n) for n in method.trained], optimizer, lr_scheduler)
    wrapped = dict(zip(method.trained, prepared[: len(method.trained)]))
    optimizer, lr_scheduler = prepared[len(method.trained):]
    # Checkpoints hold the trainable tensors only (trainable.safetensors), not accelerate's full model copies.
    accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())
    trainable = [p for g in groups for p in g["params"]]
    ema = TrainableEMA(trainable, t.ema_decay, t.ema_update_every, t.ema_device) if t.ema else None
    return Run(cfg, output_dir, components, method, wrapped, objective, prompt_ids,
               latent_cache, text_cache, accelerator, vae_dtype, weight_dtype, dataset, optimizer, lr_scheduler,
               trainable, validation_prompts, resume_from, Float32Base(cfg), lock, guidance, ema=ema)


def _accelerator(cfg: TrainConfig, output_dir: Path, method: Method) -> Accelerator:
    t = cfg.training
    # accelerate keeps mixed precision in a process-wide singleton; the demo and tests train several times in
    # one process, so forget the previous run's choice (the distributed state itself is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    # SDXL conditions on text_encoder's penultimate layer, so its last layer gets no gradient: DDP must allow it
    ddp = DistributedDataParallelKwargs(find_unused_parameters=method.trains_text_side)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, log_with=None if t.report_to == "none" else t.report_to,
        kwargs_handlers=[ddp],
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


class PriorImages:
    """What a method may take its prior examples from (``Method.prior_examples``): class images generated by
    the base model and cached, a folder of the user's images used as given, or instances under the class prompt."""

    def __init__(self, cfg: TrainConfig, components: Components, accelerator: Accelerator):
        self.cfg, self.components, self.accelerator = cfg, components, accelerator
        self.num_concepts = len(cfg.concepts)

    def as_prior(self, example: Example) -> Example:
        return Example(example.image, example.path, class_prompt(self.cfg.concepts[example.concept]), example.concept, True)

    def as_given(self, ci: int) -> list[Example]:
        concept = self.cfg.concepts[ci]
        loaded = load_image_folder(concept.class_dir, what=f"auxiliary images of concept '{concept.identifier}'",
                                   max_pixels=self.cfg.data.max_image_pixels)
        return [Example(img, path, class_prompt(concept), ci, True) for path, img in loaded]

    def generated(self, ci: int) -> list[Example]:
        cfg, d, accelerator, concept = self.cfg, self.cfg.data, self.accelerator, self.cfg.concepts[ci]
        prompt = class_prompt(concept)
        folder = Path(concept.class_dir) if concept.class_dir else default_class_dir(
            self.components.source, prompt, d.resolution, d.class_generation_steps, d.class_generation_guidance,
            revision=cfg.model.revision, variant=cfg.model.variant, seed=cfg.training.seed)
        made = ensure_class_images(
            self.components.pipeline, folder, prompt, concept.num_class_images, resolution=d.resolution,
            steps=d.class_generation_steps, guidance=d.class_generation_guidance,
            batch_size=d.class_generation_batch_size, seed=cfg.training.seed, device=accelerator.device,
            autocast_dtype=None if cfg.training.mixed_precision == "no" else DTYPES[cfg.training.mixed_precision],
            rank=accelerator.process_index, world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone)
        if made:
            logger.info("generated %d class images for %r in %s", made, prompt, folder)
        loaded = load_image_folder(folder, what=f"class images of concept '{concept.identifier}'",
                                   max_pixels=d.max_image_pixels)
        return [Example(img, path, prompt, ci, True) for path, img in loaded[: concept.num_class_images]]


def default_bucket_step(resolution: int, family, components) -> int:
    """Bucket sides step by about resolution / 16 (64 px at 1024), on the family's pixel grid."""
    multiple = family.pixel_multiple(components)
    return max(multiple, (resolution // 16) // multiple * multiple)


def place(cfg: TrainConfig, components: Components, method: Method, accelerator, weight_dtype) -> None:
    """Trainable tensors in float32 (mixed precision autocasts), frozen ones cast to ``weight_dtype``."""
    device, t = accelerator.device, cfg.training
    vae_dtype = torch.float32 if (components.family.vae_needs_float32_in_fp16 and weight_dtype == torch.float16) \
        else weight_dtype
    for name, module in components.modules.items():
        if name in method.trained:
            module.to(device)
            for p in module.parameters():
                if p.is_floating_point():  # a quantized base's packed integer weights stay as they are
                    p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
        else:
            move(module, device, vae_dtype if name == "vae" else weight_dtype)
    for module in method.frozen_modules():
        move(module, device, weight_dtype)
    if t.gradient_checkpointing:
        if components.denoiser_name in method.trained:
            components.denoiser.enable_gradient_checkpointing()
        for name in components.text_encoder_names:
            if name in method.trained:
                # non-reentrant: with frozen embeddings the reentrant variant would give LoRA no gradient
                getattr(components, name).gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.attention == "xformers" or (t.attention == "auto" and importable("xformers") and device.type == "cuda"
                                     and components.denoiser_name == "unet"):
        components.denoiser.enable_xformers_memory_efficient_attention()
    # otherwise diffusers' default processors already use torch's scaled_dot_product_attention


def move(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    # Only cast when needed: diffusers warns on (and some models special-case) explicit dtype casts.
    if next(module.parameters()).dtype == dtype:
        module.to(device)
    else:
        module.to(device, dtype=dtype)


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_optional_dependencies(t) -> None:
    """Fail before anything is written when an option needs a package (or device) that is not there."""
    if t.attention == "xformers" and not importable("xformers"):
        raise ConfigError("training.attention is 'xformers' but xformers is not installed: "
                          "pip install 't2i-personal[xformers]' (CUDA only), or use attention: sdpa")
    if t.optimizer == "adamw_8bit" and not importable("bitsandbytes"):
        raise ConfigError("training.optimizer is 'adamw_8bit' but bitsandbytes is not installed: "
                          "pip install 't2i-personal[bnb]', or use optimizer: adamw")
    if t.mixed_precision == "fp16" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise ConfigError("training.mixed_precision is 'fp16', which needs a GPU; on a CPU use bf16 or no")
    if t.report_to == "wandb" and not importable("wandb"):
        raise ConfigError("training.report_to is 'wandb' but wandb is not installed: pip install wandb, "
                          "or use report_to: tensorboard")


def make_optimizer(t, param_groups: list[dict]):
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    eight_bit = t.optimizer == "adamw_8bit" or (t.optimizer == "adamw_8bit_if_available" and importable("bitsandbytes"))
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


@torch.no_grad()
def cache_latents(components, dataset: ConceptDataset, accelerator, vae_dtype, random_flip: bool) -> dict:
    """(mean, std) of the VAE posterior per (example, flipped); sampling stays per step as without caching."""
    cache, flips = {}, (False, True) if random_flip else (False,)
    side = dataset.transform.resolution
    for key in tqdm(dataset.example_keys(), desc="caching latents", disable=not accelerator.is_local_main_process):
        for target in dataset.example_targets(key):  # a prior image: once per bucket of its concept
            # center crop: deterministic
            pixels = dataset.transform(dataset.example(key).image, random.Random(0), target).pixels
            for flipped in flips:
                px = pixels.flip(-1) if flipped else pixels
                dist = components.vae.encode(px[None].to(accelerator.device, vae_dtype)).latent_dist
                cache[(key, flipped, target or (side, side))] = (dist.mean[0], dist.std[0])
    return cache
