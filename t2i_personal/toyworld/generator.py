"""The toy world's base text-to-image model (``builtin:toy``): Stable Diffusion 1.x architecture at 64 px.

Trained from scratch, in two stages, on rendered world images and their captions:

1. **VAE** (AutoencoderKL, 64×64×3 → 16×16×4): ``L = ‖x̂ − x‖² + ‖x̂ − x‖₁ + β·KL`` with a small β (1e-6, as
   in SD's autoencoder) so the latent stays close to a deterministic code; no adversarial or perceptual term (no
   pretrained LPIPS network exists offline). ``scaling_factor`` is set to 1/std of the latents, as SD does.
2. **Denoiser**: UNet2DConditionModel and a CLIP text encoder (real CLIP BPE tokenizer) trained jointly with
   the ε-prediction loss of DDPM on SD's scaled-linear schedule, min-SNR-γ weighting (γ = 5; Hang et al. 2023)
   to converge faster, 10% empty captions for classifier-free guidance, several captions per image (attributes
   randomly left out, as real captions do), and an EMA of both networks, which is what is saved.

Pretraining never shows the held-out (class, colour, scene) triples, the personal subjects or the personal style
(see ``world.py``). Each stage stops at its step count or its time budget, whichever comes first; the steps
actually run are recorded in ``training.json`` so a run reproduces without the budget.

The result is a plain diffusers folder (``StableDiffusionPipeline.from_pretrained(path)`` works) with weights
stored in float16 to keep the shipped files small; configs record float32 so every loader computes in float32.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_dir, write_json_atomic
from . import world
from .dataset import render_set
from .reports import image_grid, save_loss_curve
from . import schedule
from .schedule import TrainingClock

ARCHITECTURE = Path(__file__).parent / "configs" / "toy-sd.json"
WEIGHTS = Path(__file__).parent / "weights" / "toy-sd"
SAMPLE_PROMPTS = [
    "a photo of a red dog on the grass", "a blue striped cat in the snow", "a yellow car on a city street",
    "a green spotted vase on a wooden floor", "a brown teddy bear wearing a red hat on the beach",
    "a smiling person with long blonde hair wearing glasses", "a purple checkered dog under the night sky",
    "a white cat wearing a blue scarf on pink fabric",
]


def architecture() -> dict:
    return json.loads(ARCHITECTURE.read_text())


def build_untrained(seed: int = 0):
    """Fresh (vae, unet, text_encoder, tokenizer, scheduler) from the declarative architecture."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.tokenizer import build_clip_tokenizer

    arch = architecture()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch["vae"])
    unet = UNet2DConditionModel(**arch["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
    sched_cfg = dict(arch["scheduler"])
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    return vae, unet, text_encoder, build_clip_tokenizer(), scheduler


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float):
    rate = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - rate)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_trained(folder: str | Path):
    """(vae, unet, text_encoder, tokenizer, scheduler) of a saved toy-sd folder, in float32."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler


def _optimise(params: list, loss_at, *, name: str, steps: int, lr: float, time_budget_s: float | None, warmup: int,
              weight_decay: float = 0.0, after_step=None, clock: TrainingClock | None = None) -> dict:
    """The loop every stage shares: AdamW on ``params``, gradient clipping at 1, the shared clock's warm-up and
    cosine, a tqdm bar; ``loss_at(step)`` computes one batch's loss (``clock``: one the caller also reads, for a
    loss that changes with the run's progress). Returns the loss history and steps run."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    clock = clock or TrainingClock(steps, time_budget_s, warmup=warmup)
    history, step = {f"{name} loss": []}, 0
    bar = tqdm(total=steps, desc=name, mininterval=5)
    while clock.running(step):
        for group in opt.param_groups:
            group["lr"] = lr * clock.lr_factor(step)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if after_step is not None:
            after_step(step)
        if step % 25 == 0:
            history[f"{name} loss"].append((step, loss.item()))
        step += 1
        bar.update(1)
    bar.close()
    return {"history": history, "steps": step}


def train_vae(vae, images: torch.Tensor, *, steps: int, batch_size: int, lr: float, time_budget_s: float | None,
              generator: torch.Generator, device: str, kl_weight: float = 1e-6) -> dict:
    """``images``: uint8 (N, 64, 64, 3) on ``device``. Returns the loss history and the steps run."""
    vae.train()

    def loss_at(step):
        idx = torch.randint(len(images), (batch_size,), generator=generator).to(images.device)
        x = _to_unit(images[idx])
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        return F.mse_loss(recon, x) + F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()

    info = _optimise(list(vae.parameters()), loss_at, name="vae", steps=steps, lr=lr, time_budget_s=time_budget_s,
                     warmup=100)
    vae.eval()
    return info


def train_decoder(vae, images: torch.Tensor, latents: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                  time_budget_s: float | None, generator: torch.Generator, device: str, crop: int = 12) -> dict:
    """Decoder-only fine-tuning on fixed posterior means (``latents``, unscaled): the encoder and so the
    denoiser's latent space stay as they are. Random ``crop``×``crop`` latent windows (and the matching pixels)
    make a step several times cheaper than a full image, which is what makes this affordable on a CPU."""
    factor = images.shape[1] // latents.shape[-1]
    vae.train()

    def loss_at(step):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        top, left = torch.randint(latents.shape[-1] - crop + 1, (2,), generator=generator).tolist()
        z = latents[idx, :, top:top + crop, left:left + crop].to(device)
        x = _to_unit(images[idx.to(images.device), top * factor:(top + crop) * factor,
                            left * factor:(left + crop) * factor])
        with _autocast(device):
            recon = vae.decode(z).sample.float()
        return F.mse_loss(recon, x) + F.l1_loss(recon, x)

    info = _optimise([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()], loss_at, name="vae",
                     steps=steps, lr=lr, time_budget_s=time_budget_s, warmup=50)
    vae.eval()
    return info


def hue_rotated(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, H, W, 3) with a random hue rotation (in YIQ space) applied to ``fraction`` of the images.

    The world has nine colours; without this the decoder maps every unseen colour (a personal subject's teal)
    to its nearest palette colour, and no amount of personalization can draw it."""
    n = len(images)
    chosen = torch.rand(n, generator=generator) < fraction
    theta = torch.rand(n, generator=generator) * 2 * math.pi
    out = torch.einsum("nij,nhwj->nhwi", hue_matrix(theta), images.cpu().float()).clamp(0, 255).round().to(torch.uint8)
    return torch.where(chosen[:, None, None, None], out, images.cpu()).to(images.device)


def hue_matrix(theta: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) RGB matrices rotating the hue by ``theta`` (radians, (N,)) in YIQ space, brightness kept."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(theta), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Posterior means (unscaled) of uint8 images, in float32."""
    out = [vae.encode(_to_unit(images[i:i + batch_size])).latent_dist.mean.float()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB, on 0..255 pixels) of decode(encode-mean(x)), on uint8 (N, 64, 64, 3)."""
    values = []
    for i in range(0, len(images), batch_size):
        x = _to_unit(images[i:i + batch_size])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) * 127.5).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values.append(10 * torch.log10(255.0**2 / mse))
    return torch.cat(values).mean().item()


def tokenize_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) ids, each distinct caption tokenized once."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([row[c] for c in captions])]


def caption_variants(scenes: list[world.Scene], per_image: int, seed: int) -> list[str]:
    """``per_image`` captions for each scene, attributes dropped at random (row-major: image i → i*k..i*k+k-1)."""
    rng = random.Random(seed)
    return [world.describe(s, rng) for s in scenes for _ in range(per_image)]


def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def train_denoiser(unet, text_encoder, scheduler, latents: torch.Tensor, token_ids: torch.Tensor,
                   empty_ids: torch.Tensor, *, steps: int, batch_size: int, lr: float, time_budget_s: float | None,
                   generator: torch.Generator, device: str, caption_dropout: float = 0.1, min_snr_gamma: float = 5.0,
                   ema_decay: float = 0.999):
    """ε-prediction training of UNet + text encoder on pre-encoded, pre-scaled ``latents`` (N, 4, 16, 16).
    ``token_ids``: (N, K, 77), K captions per image. Returns (ema_unet, ema_text_encoder, info)."""

    unet.train()
    text_encoder.train()
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    n, k = token_ids.shape[:2]

    def loss_at(step):
        idx = torch.randint(n, (batch_size,), generator=generator)
        which = torch.randint(k, (batch_size,), generator=generator)
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None], token_ids[idx, which]).to(device)
        x0 = latents[idx.to(latents.device)]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        with _autocast(device):
            pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids)[0]).sample.float()
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * _min_snr_weights(scheduler, t, min_snr_gamma)).mean()

    def update_ema(step):
        _ema_update(ema_unet, unet, step, ema_decay)
        _ema_update(ema_te, text_encoder, step, ema_decay)

    info = _optimise([*unet.parameters(), *text_encoder.parameters()], loss_at, name="denoiser", steps=steps, lr=lr,
                     time_budget_s=time_budget_s, warmup=200, weight_decay=1e-2, after_step=update_ema)
    return ema_unet, ema_te, info


def save_pipeline(out_dir: str | Path, vae, unet, text_encoder, tokenizer, scheduler) -> Path:
    """A plain diffusers SD-1.x folder, float16 weights, float32 in every config; written to a temp folder first."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(out_dir) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        te_config = tmp / "text_encoder" / "config.json"
        cfg = json.loads(te_config.read_text())
        cfg["dtype"] = "float32"  # transformers 5 would otherwise load the float16 file as float16
        te_config.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return Path(out_dir)


def sample_images(pipe, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance_scale: float = 5.0,
                  device: str = "cpu") -> np.ndarray:
    """uint8 (len(prompts), 64, 64, 3), one fixed-seed DDIM sample per prompt."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator(device).manual_seed(seed)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
               output_type="np", height=64, width=64).images
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def reproduce_command(settings: dict, vae_steps_run: int, unet_steps_run: int) -> str:
    """The command that repeats a run exactly: every recorded setting, the steps run, and no time budgets."""
    return schedule.reproduce_command("generator", settings, {
        "vae_steps": vae_steps_run, "unet_steps": unet_steps_run, "vae_time_budget_s": None,
        "unet_time_budget_s": None})


def _last(points: list[tuple[int, float]]) -> float | None:
    return points[-1][1] if points else None


def train(out_dir: str | Path = WEIGHTS, *, device: str = "cpu", seed: int = 0, num_images: int = 60000,
          captions_per_image: int = 4, vae_steps: int = 4000, vae_batch_size: int = 64, vae_lr: float = 1e-3,
          vae_time_budget_s: float | None = None, unet_steps: int = 20000, unet_batch_size: int = 128,
          unet_lr: float = 5e-4, unet_time_budget_s: float | None = None, workers: int | None = None,
          init_from: str | None = None, vae_train_encoder: bool = True, accessory_rate: float = 0.35,
          vae_hue_fraction: float = 0.0, held_out_images: int = 512, sample_steps: int = 25) -> dict:
    """Both stages end to end; writes the pipeline folder plus ``training.json``, loss curves and a sample grid.

    ``init_from`` continues from a saved toy-sd folder instead of random weights (its ``training.json`` is kept
    under ``"previous"``). With ``vae_train_encoder=False`` only the VAE decoder trains, as SD's ft-MSE VAE did:
    the latents, and so the denoiser trained on them, stay valid. ``vae_hue_fraction`` of the VAE's training
    images are hue-rotated (see ``hue_rotated``); the denoiser always learns the world's own colours.
    ``held_out_images`` measure the VAE's PSNR; ``sample_steps`` draw ``samples.png`` (fewer: quicker smoke runs).
    """
    settings = {k: v for k, v in locals().items() if k != "out_dir"}
    out_dir = Path(out_dir)
    started = time.perf_counter()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = render_set(num_images, seed=seed + 1, kind="world", workers=workers, accessory_rate=accessory_rate)
    held = torch.from_numpy(render_set(held_out_images, seed=seed + 2, kind="world", workers=workers).images).to(device)
    images = torch.from_numpy(data.images).to(device)
    previous = None
    if init_from:
        vae, unet, text_encoder, tokenizer, scheduler = load_trained(init_from)
        previous = json.loads((Path(init_from) / "training.json").read_text())
    else:
        vae, unet, text_encoder, tokenizer, scheduler = build_untrained(seed)
    vae, unet, text_encoder = vae.to(device), unet.to(device), text_encoder.to(device)
    generator = torch.Generator().manual_seed(seed)

    vae_args = dict(steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr, time_budget_s=vae_time_budget_s,
                    generator=generator, device=device)
    vae_images = hue_rotated(images, vae_hue_fraction, generator) if vae_hue_fraction else images
    if vae_train_encoder:
        vae_info = train_vae(vae, vae_images, **vae_args)
        latents = encode_latents(vae, images)
        vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    else:
        vae_info = train_decoder(vae, vae_images, encode_latents(vae, vae_images), **vae_args)
        latents = encode_latents(vae, images)
    psnr = reconstruction_psnr(vae, held)
    scaling = vae.config.scaling_factor
    latents = latents * scaling

    token_ids = tokenize_captions(tokenizer, caption_variants(data.scenes, captions_per_image, seed + 3))
    token_ids = token_ids.view(num_images, captions_per_image, -1)
    empty_ids = tokenize_captions(tokenizer, [""])[0]
    ema_unet, ema_te, den_info = train_denoiser(
        unet, text_encoder, scheduler, latents, token_ids, empty_ids, steps=unet_steps,
        batch_size=unet_batch_size, lr=unet_lr, time_budget_s=unet_time_budget_s, generator=generator, device=device)

    folder = save_pipeline(out_dir, vae.cpu().float(), ema_unet.cpu().float(), ema_te.cpu().float(), tokenizer,
                           scheduler)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    samples = sample_images(pipe, SAMPLE_PROMPTS * 2, seed=seed, steps=sample_steps, device=device)
    image_grid(samples, columns=len(SAMPLE_PROMPTS), scale=2).save(folder / "samples.png")
    save_loss_curve({**vae_info["history"], **den_info["history"]}, folder / "loss.png", "toy-sd pretraining")
    import diffusers
    import transformers

    record = {
        "settings": settings, "vae_steps_run": vae_info["steps"], "unet_steps_run": den_info["steps"],
        "vae_psnr_db": psnr, "scaling_factor": scaling, "seconds": time.perf_counter() - started,
        "final_vae_loss": _last(vae_info["history"]["vae loss"]),
        "final_denoiser_loss": _last(den_info["history"]["denoiser loss"]), "sample_prompts": SAMPLE_PROMPTS,
        "previous": previous,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "reproduce": reproduce_command(settings, vae_info["steps"], den_info["steps"]),
    }
    write_json_atomic(folder / "training.json", record)
    return record
