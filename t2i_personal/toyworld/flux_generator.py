"""The toy world's second base model (``builtin:toy-flux``): FLUX.1-dev architecture at 64 px.

A ``FluxTransformer2DModel`` (2 double-stream + 4 single-stream blocks, width 128) over the toy-sd VAE's 16×16×4
latents packed 2×2 into 64 tokens, a CLIP text encoder for the pooled vector and a T5 encoder for the sequence,
all three trained from scratch together on rendered world images and their captions with the rectified-flow
objective of ``families/flow_matching.py``:

    x_σ = (1 − σ) x + σ ε,  L = ‖v_θ(x_σ, σ, c, g) − (ε − x)‖²,  σ = shift_μ(sigmoid(N(0, 1)))

with μ FLUX's resolution shift for 64 tokens (the scheduler config's base/max shift, so training and the
pipeline's Euler sampler agree). 10% of captions are dropped (empty prompt) so the model also learns v(x, ∅).

Guidance embedding, as FLUX-dev: the last ``distill_fraction`` of the run distils classifier-free guidance into
the ``guidance`` input (Meng et al. 2023, stage one): a frozen copy of the model (its EMA) is the teacher, the
student sees g ~ U[1, ``max_guidance``] and learns ``v_T(∅) + g · (v_T(c) − v_T(∅))`` (teacher read at g = 1),
so ``FluxPipeline(prompt, guidance_scale=g)`` guides without a second pass, as the real dev model does. Before
that stage every sample is read at g = 1.

Why the toy-sd VAE (4 channels, not FLUX's 16): ``FluxPipeline`` takes its latent channels from the transformer
(``in_channels // 4``), so the family does not need 16; sharing the VAE keeps one latent space for both
generators and 2 MB less to ship. Its ``shift_factor``/``scaling_factor`` are set here from the latents' mean
and spread, as FLUX's VAE config records its own.

Why the tokenizers: CLIP's is CLIP's real BPE cut to the merges the world's words use
(``models/tokenizer.write_clip_tokenizer_files(words=...)``: every world word splits exactly as in CLIP-L's,
49,408 → ~1,000 ids, so the shipped embedding table is 0.1 MB, not 6 MB); T5's is a Unigram vocabulary of the
world's words (``models/t5_tokenizer.build_word_t5_tokenizer``: one token per word, any other text in characters), with ``model_max_length`` 32: the window the model was trained
with, which the toolkit's FLUX family then uses by default. A plain ``FluxPipeline`` call must pass
``max_sequence_length=32`` (its default, 512, would show the model 480 padding tokens it never saw).

Pretraining never shows the held-out (class, colour, scene) triples, the personal subjects or the personal style.
The result is a plain diffusers ``FluxPipeline`` folder, weights in float16, configs in float32.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_dir, write_json_atomic
from . import world
from .dataset import render_set
from .generator import (SAMPLE_PROMPTS, _autocast, _ema_update, _last, _optimise, caption_variants, encode_latents,
                        tokenize_captions)
from .reports import image_grid, save_loss_curve
from .schedule import TrainingClock, reproduce_command

ARCHITECTURE = Path(__file__).parent / "configs" / "toy-flux.json"
WEIGHTS = Path(__file__).parent / "weights" / "toy-flux"
TOY_SD = Path(__file__).parent / "weights" / "toy-sd"
SAMPLE_GUIDANCE = 3.5
# Words beyond the world's captions that personalization prompts use (identifiers, style phrases, the
# benchmarks' templates); they get whole-word tokens in both vocabularies.
EXTRA_TEXT = ["a photo of sks dog", "a sks cat", "in the style of sks", "a painting in the style of",
              "an outline poster of", "a picture of a person with a hat", "a dog wearing headphones",
              "a cat with a backpack", "a teddy bear next to a car"]


def architecture() -> dict:
    return json.loads(ARCHITECTURE.read_text())


def corpus(n: int = 4000, seed: int = 12345) -> tuple[str, ...]:
    """The text both tokenizers are built from: world captions (full and partial), the package's prompt sets,
    the personal subjects' and styles' words and :data:`EXTRA_TEXT`. Deterministic."""
    from ..models.t5_tokenizer import _corpus as prompt_sets

    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        scene = world.sample_scene(rng, allow_held_out=True)
        captions += [world.describe(scene, full=True), world.describe(scene, rng)]
    names = [*world.SUBJECTS, *world.STYLES, *(s.replace("-", " ") for s in world.STYLES)]
    return tuple(captions + prompt_sets() + EXTRA_TEXT + names)


def build_tokenizers():
    """(CLIP tokenizer with the world's cut of CLIP's BPE, T5 tokenizer of the world's words)."""
    from transformers import CLIPTokenizer

    from ..models.t5_tokenizer import build_word_t5_tokenizer
    from ..models.tokenizer import EOS, clip_words, write_clip_tokenizer_files

    arch, text = architecture(), corpus()
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp, words=clip_words(text))
        clip = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77, pad_token=EOS)
    t5 = build_word_t5_tokenizer(text, model_max_length=arch["t5_window"])
    return clip, t5


def build_untrained(seed: int = 0, vae_folder: str | Path = TOY_SD):
    """Fresh (transformer, CLIP text encoder, T5 encoder, tokenizers, scheduler) and the toy-sd VAE."""
    import diffusers
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    arch = architecture()
    clip_tok, t5_tok = build_tokenizers()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**arch["transformer"])
    clip = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"], vocab_size=len(clip_tok),
                                        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(**arch["text_encoder_2"], vocab_size=len(t5_tok)))
    sched_cfg = dict(arch["scheduler"])
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    vae = AutoencoderKL.from_pretrained(vae_folder, subfolder="vae", torch_dtype=torch.float32)
    return dict(transformer=transformer, text_encoder=clip, text_encoder_2=t5, tokenizer=clip_tok,
                tokenizer_2=t5_tok, scheduler=scheduler, vae=vae)


def load_trained(folder: str | Path) -> dict:
    from diffusers import FluxPipeline

    return dict(FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32).components)


def save_pipeline(out_dir: str | Path, parts: dict) -> Path:
    """A plain diffusers FLUX folder, float16 weights, float32 in every config; written to a temp folder first."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**parts)
    with atomic_dir(out_dir) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        for name in ("text_encoder", "text_encoder_2"):
            config = tmp / name / "config.json"
            cfg = json.loads(config.read_text())
            cfg["dtype"] = "float32"  # transformers 5 would otherwise load the float16 file as float16
            config.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return Path(out_dir)


class _Denoiser(torch.nn.Module):
    """Transformer + both text encoders, called as the toolkit's FLUX family calls them (``Flux.encode``/``denoise``),
    so pretraining and personalization read conditioning the same way."""

    def __init__(self, transformer, text_encoder, text_encoder_2):
        super().__init__()
        self.transformer, self.text_encoder, self.text_encoder_2 = transformer, text_encoder, text_encoder_2

    def forward(self, noisy, timesteps, clip_ids, t5_ids, guidance):
        from ..families.flux import Flux

        family = Flux()
        cond = family.encode(None, [clip_ids, t5_ids], text_encoders=(self.text_encoder, self.text_encoder_2))
        cond.guidance = guidance
        return family.denoise(self.transformer, noisy, timesteps, cond)


def train_denoiser(model: _Denoiser, objective, latents, clip_ids, t5_ids, empty_ids, *, steps, batch_size, lr,
                   time_budget_s, generator, device, caption_dropout=0.1, ema_decay=0.999, distill_fraction=0.25,
                   max_guidance=6.0, distill_start_step=None):
    """Returns (EMA model, info). ``clip_ids``/``t5_ids``: (N, K, L) token ids, K captions per image.

    Distillation starts once the run's progress (steps or time, as the clock's) reaches ``1 − distill_fraction``,
    or at ``distill_start_step`` when given (what a repeat of a time-cut run needs: distillation steps are slower,
    so the same progress falls on another step)."""
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    state = {"teacher": None, "distill_steps": 0}
    clock = TrainingClock(steps, time_budget_s, warmup=200)
    n, k = clip_ids.shape[:2]
    empty_clip, empty_t5 = empty_ids

    def loss_at(step):
        idx = torch.randint(n, (batch_size,), generator=generator)
        which = torch.randint(k, (batch_size,), generator=generator)
        x0 = latents[idx].to(device)
        distill = step >= distill_start_step if distill_start_step is not None else \
            clock.progress(step) >= 1 - distill_fraction
        if distill and state["teacher"] is None:
            state["teacher"] = copy.deepcopy(ema).eval().requires_grad_(False)
        drop = torch.zeros(batch_size, dtype=torch.bool) if distill else \
            torch.rand(batch_size, generator=generator) < caption_dropout
        c_ids = torch.where(drop[:, None], empty_clip[None], clip_ids[idx, which]).to(device)
        t_ids = torch.where(drop[:, None], empty_t5[None], t5_ids[idx, which]).to(device)
        noised = objective(x0)
        ones = torch.ones(batch_size, device=device)
        if distill:
            state["distill_steps"] += 1
            g = 1 + (max_guidance - 1) * torch.rand(batch_size, generator=generator).to(device)
            with torch.no_grad(), _autocast(device):
                both = state["teacher"](noised.noisy_latents.repeat(2, 1, 1, 1), noised.timesteps.repeat(2),
                                        torch.cat([c_ids, empty_clip[None].expand_as(c_ids).to(device)]),
                                        torch.cat([t_ids, empty_t5[None].expand_as(t_ids).to(device)]),
                                        ones.repeat(2)).float()
            v_c, v_u = both.chunk(2)
            target = v_u + g.view(-1, 1, 1, 1) * (v_c - v_u)
        else:
            g, target = ones, noised.target
        with _autocast(device):
            pred = model(noised.noisy_latents, noised.timesteps, c_ids, t_ids, g).float()
        return F.mse_loss(pred, target)

    def update_ema(step):
        _ema_update(ema, model, step, ema_decay)

    info = _optimise(list(model.parameters()), loss_at, name="denoiser", steps=steps, lr=lr,
                     time_budget_s=time_budget_s, warmup=200, weight_decay=1e-2, after_step=update_ema, clock=clock)
    info["distill_steps"] = state["distill_steps"]
    info["distill_start_step"] = info["steps"] - state["distill_steps"] if state["distill_steps"] else None
    return ema, info


def sample_images(folder: str | Path, prompts: list[str], *, seed: int = 0, steps: int = 25,
                  guidance_scale: float = SAMPLE_GUIDANCE, device: str = "cpu") -> np.ndarray:
    """uint8 (len(prompts), 64, 64, 3): one fixed-seed sample per prompt with the folder's own Euler scheduler."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=64, width=64,
               max_sequence_length=pipe.tokenizer_2.model_max_length, output_type="np",
               generator=torch.Generator(device).manual_seed(seed)).images
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def train(out_dir: str | Path = WEIGHTS, *, device: str = "cpu", seed: int = 0, num_images: int = 30000,
          captions_per_image: int = 4, steps: int = 20000, batch_size: int = 64, lr: float = 5e-4,
          time_budget_s: float | None = None, distill_fraction: float = 0.25, max_guidance: float = 6.0,
          distill_start_step: int | None = None, workers: int | None = None, init_from: str | None = None,
          accessory_rate: float = 0.35, sample_steps: int = 25) -> dict:
    """Pretrain (or continue ``init_from``, a saved toy-flux folder) and write the pipeline folder with
    ``training.json`` (every setting, the steps run, the command that repeats it), ``loss.png`` and ``samples.png``."""
    settings = {k: v for k, v in locals().items() if k != "out_dir"}
    from ..families.flow_matching import FlowMatchingObjective

    started = time.perf_counter()
    torch.manual_seed(seed)  # the objective draws noise and σ from the global generator
    data = render_set(num_images, seed=seed + 1, kind="world", workers=workers, accessory_rate=accessory_rate)
    previous = None
    if init_from:
        parts = load_trained(init_from)
        previous = json.loads((Path(init_from) / "training.json").read_text())
    else:
        parts = build_untrained(seed)
    vae = parts["vae"].to(device)
    raw = encode_latents(vae, torch.from_numpy(data.images).to(device)).cpu()
    if not init_from:  # FLUX's convention: (z − shift) · scale has zero mean and unit spread
        vae.register_to_config(shift_factor=raw.mean().item(), scaling_factor=1.0 / (raw - raw.mean()).std().item())
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    texts = caption_variants(data.scenes, captions_per_image, seed + 3)
    clip_ids = tokenize_captions(parts["tokenizer"], texts).view(num_images, captions_per_image, -1)
    t5_ids = tokenize_captions(parts["tokenizer_2"], texts).view(num_images, captions_per_image, -1)
    empty = (tokenize_captions(parts["tokenizer"], [""])[0], tokenize_captions(parts["tokenizer_2"], [""])[0])
    model = _Denoiser(parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]).to(device)
    objective = FlowMatchingObjective(parts["scheduler"].config, timestep_sampling="logit_normal",
                                      shift="resolution", patch_size=2)
    ema, info = train_denoiser(model, objective, latents, clip_ids, t5_ids, empty, steps=steps,
                               batch_size=batch_size, lr=lr, time_budget_s=time_budget_s,
                               generator=torch.Generator().manual_seed(seed), device=device,
                               distill_fraction=distill_fraction, max_guidance=max_guidance,
                               distill_start_step=distill_start_step)
    ema = ema.cpu().float()
    folder = save_pipeline(out_dir, {**parts, "vae": vae.cpu().float(), "transformer": ema.transformer,
                                     "text_encoder": ema.text_encoder, "text_encoder_2": ema.text_encoder_2})
    samples = sample_images(folder, SAMPLE_PROMPTS * 2, seed=seed, steps=sample_steps, device=device)
    image_grid(samples, columns=len(SAMPLE_PROMPTS), scale=2).save(folder / "samples.png")
    save_loss_curve(info["history"], folder / "loss.png", "toy-flux pretraining")
    import diffusers
    import transformers

    record = {
        "settings": settings, "steps_run": info["steps"], "distill_steps_run": info["distill_steps"],
        "distill_start_step": info["distill_start_step"],
        "seconds": time.perf_counter() - started, "final_loss": _last(info["history"]["denoiser loss"]),
        "vae": {"from": "toy-sd", "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor},
        "sample_prompts": SAMPLE_PROMPTS, "sample_guidance": SAMPLE_GUIDANCE, "previous": previous,
        "parameters": {name: sum(p.numel() for p in getattr(ema, name).parameters())
                       for name in ("transformer", "text_encoder", "text_encoder_2")},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "reproduce": reproduce_command("generator-flux", settings, {
            "steps": info["steps"], "time_budget_s": None, "distill_start_step": info["distill_start_step"]}),
    }
    write_json_atomic(folder / "training.json", record)
    return record
