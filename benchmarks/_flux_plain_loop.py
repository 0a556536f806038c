"""The plain-diffusers reference loop of ``train_throughput.py --model tiny-flux / flux-arch``.

Per step it does what diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` does with its defaults
(read at diffusers main, 2026-07; no ``--cache_latents``, no ``--train_text_encoder``, one instance prompt):

* set-up: every model frozen and cast to the mixed-precision dtype, then peft LoRA on the transformer (the
  script's twelve target modules, ``init_lora_weights="gaussian"``, rank = alpha = 4; trainable weights are
  upcast to float32 under fp16 only, as the script does), AdamW (the script's betas, eps and weight decay 1e-4),
  a constant LR schedule, images resized / center-cropped / normalised once up front (the script's dataset keeps
  the tensors), a shuffled DataLoader, ``accelerator.prepare``;
* per step: the batch's prompts tokenized and encoded with CLIP (pooled) and T5 (sequence) under ``no_grad``.
  The script encodes the instance prompt once before training, but since diffusers PR #12264 (Sep 2025) its loop
  calls ``compute_text_embeddings(prompts, ...)`` again on every step whatever the prompts are, so per-step
  encoding is what it costs today (our side runs with ``cache_text_embeddings: false`` to match);
  VAE encode, ``(z - shift_factor) * scaling_factor``, noise, ``compute_density_for_timestep_sampling("none")``,
  the scheduler's timestep and its sigma looked up as the script's ``get_sigmas`` does, the noisy input,
  ``FluxPipeline._pack_latents``, ``_prepare_latent_image_ids``, guidance 3.5 expanded to the batch (when the
  transformer has ``guidance_embeds``), the transformer at ``timestep / 1000``, ``_unpack_latents``, target
  ``noise - latents``, ``compute_loss_weighting_for_sd3("none")``, the weighted MSE, backward, clipping at 1.0,
  AdamW step, LR step, zero_grad.

Deviation kept on purpose: ``drop_last=True``, so every batch is full as in our endless stream (the SD reference
does the same).
"""

from __future__ import annotations

from pathlib import Path

# diffusers' train_dreambooth_lora_flux.py defaults (--lora_layers unset)
TARGET_MODULES = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"]
RANK = 4  # --rank / --lora_alpha defaults
LEARNING_RATE = 1e-4  # --learning_rate
ADAM_WEIGHT_DECAY = 1e-4  # --adam_weight_decay
GUIDANCE_SCALE = 3.5  # --guidance_scale
MAX_SEQUENCE_LENGTH = 512  # --max_sequence_length
INSTANCE_PROMPT = "a photo of sks dog"


def prepare(args, data_dir: Path):
    """(loader, step, accelerator): ``step(batch)`` runs one optimizer step and returns the loss as a float."""
    import torch
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import (cast_training_params, compute_density_for_timestep_sampling,
                                          compute_loss_weighting_for_sd3)
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms

    from t2i_personal.models.tiny import build_tiny  # only to build the same random components

    torch.manual_seed(0)
    comps = build_tiny(args.model)
    tokenizers = [comps.tokenizer, comps.tokenizer_2]
    text_encoders = [comps.text_encoder, comps.text_encoder_2]
    vae, transformer = comps.vae, comps.transformer
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device

    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        encoder.eval()  # as from_pretrained leaves them (built-in tiny models are constructed in training mode)
    vae.eval()
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    vae.to(device, dtype=weight_dtype)
    transformer.to(device, dtype=weight_dtype)
    for encoder in text_encoders:
        encoder.to(device, dtype=weight_dtype)
    if getattr(args, "gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, init_lora_weights="gaussian",
                                       target_modules=TARGET_MODULES))
    if args.mixed_precision == "fp16":
        cast_training_params([transformer], dtype=torch.float32)
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": LEARNING_RATE}], betas=(0.9, 0.999),
                                  weight_decay=ADAM_WEIGHT_DECAY, eps=1e-8)

    # the script's DreamBoothDataset: resize, crop, ToTensor, Normalize once at construction
    resize = transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR)
    crop = transforms.CenterCrop(args.resolution)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    pixel_values = [to_tensor(crop(resize(Image.open(p).convert("RGB")))) for p in sorted(data_dir.glob("*.png"))]

    class Instances(torch.utils.data.Dataset):
        def __len__(self):
            return len(pixel_values)

        def __getitem__(self, i):
            return {"instance_images": pixel_values[i], "instance_prompt": INSTANCE_PROMPT}

    def collate(examples):
        pixels = torch.stack([e["instance_images"] for e in examples]).to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixels, "prompts": [e["instance_prompt"] for e in examples]}

    loader = torch.utils.data.DataLoader(Instances(), batch_size=args.batch, shuffle=True, drop_last=True,
                                         collate_fn=collate, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=args.steps + args.warmup)
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds

    @torch.no_grad()
    def compute_text_embeddings(prompts):
        """The script's encode_prompt: CLIP's pooled output, T5's last hidden state, zero text ids."""
        clip_ids = tokenizers[0](prompts, padding="max_length", max_length=77, truncation=True,
                                 return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        pooled = text_encoders[0](clip_ids.to(device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=text_encoders[0].dtype, device=device)
        t5_ids = tokenizers[1](prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                               return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        prompt_embeds = text_encoders[1](t5_ids.to(device))[0].to(dtype=text_encoders[1].dtype, device=device)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=text_encoders[0].dtype)
        return prompt_embeds, pooled, text_ids

    def get_sigmas(timesteps, n_dim, dtype):
        sigmas = noise_scheduler.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = noise_scheduler.timesteps.to(device)
        timesteps = timesteps.to(device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    transformer.train()

    def step(batch) -> float:
        with accelerator.accumulate([transformer]):
            prompt_embeds, pooled_prompt_embeds, text_ids = compute_text_embeddings(batch["prompts"])
            pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
            model_input = vae.encode(pixel_values).latent_dist.sample()
            model_input = ((model_input - shift) * scale).to(dtype=weight_dtype)
            b, c, h, w = model_input.shape
            latent_image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, weight_dtype)
            noise = torch.randn_like(model_input)
            u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b, logit_mean=0.0,
                                                      logit_std=1.0, mode_scale=1.29)
            indices = (u * noise_scheduler.config.num_train_timesteps).long()
            timesteps = noise_scheduler.timesteps[indices].to(device=model_input.device)
            sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            packed = FluxPipeline._pack_latents(noisy_model_input, batch_size=b, num_channels_latents=c, height=h,
                                                width=w)
            guidance = torch.tensor([GUIDANCE_SCALE], device=device).expand(b) if guidance_embeds else None
            model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                     pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                     txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
            model_pred = FluxPipeline._unpack_latents(model_pred, height=h * vae_scale_factor,
                                                      width=w * vae_scale_factor, vae_scale_factor=vae_scale_factor)
            weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
            target = noise - model_input
            loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        return loss.detach().item()

    return loader, step, accelerator
