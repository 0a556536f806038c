"""APG, asymmetric prompt guidance (FreeCure v2 §3.4): restore expressions, which no mask can localise.

Released only as a figure (panel d of the paper's method figure); this is **this project's reconstruction**:

1. take the FASA result's latents z₀ (the paper encodes the decoded image; the latents are that image without the
   VAE round trip);
2. DDIM-invert them with the *personalized* model under the **neutral** prompt P_n (the prompt with its expression
   words removed), classifier-free guidance 1, up to the timestep γ·T:

       ε = ε_θ(z_t, t, P_n),   ẑ₀ = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t,   z_t' = √ᾱ_t'·ẑ₀ + √(1−ᾱ_t')·ε   (t < t');

3. regenerate from z_{γT} with the **full** prompt P_f under the sampling CFG, with deterministic DDIM (η = 0)
   on the same timestep grid, FASA off.

The asymmetry (neutral in, expressive out) lets the second half of the trajectory add the expression while the
first half of the structure, which carries identity and the FASA-repaired attributes, is kept. γ = 0.5 by default
(the brief's middle of {0.3, 0.5, 0.7}); γ = 0 is a no-op. Unknowns (the paper's γ, step counts, guidance) are
documented as such in this repository's README.md.
"""

from __future__ import annotations

import re

import torch

EXPRESSION_WORDS = (
    "smiling", "smile", "smiles", "smiley", "laughing", "laugh", "laughs", "grinning", "grin", "happy", "happily",
    "angry", "angrily", "frowning", "frown", "crying", "cry", "sad", "sadly", "surprised", "shocked", "screaming",
    "shouting", "winking", "wink", "scared", "afraid", "disgusted", "pouting", "yawning", "serious", "excited",
)


def _word_pattern(words) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b", re.I)


def expression_words_in(prompt: str, words=EXPRESSION_WORDS) -> list[str]:
    return [m.group(0) for m in _word_pattern(words).finditer(prompt)]


def neutral_prompt(prompt: str, words=EXPRESSION_WORDS) -> str:
    """``prompt`` without its expression words and the connectives they leave dangling."""
    text = _word_pattern(words).sub("", prompt)
    text = re.sub(r"\b(and|while|is|are)\s*(?=[,.]|$|\band\b)", "", text)  # "smiling and laughing" -> ""
    text = re.sub(r"\s+([,.])", r"\1", text)
    text = re.sub(r"([,.])\s*(?=[,.])", "", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,.")


class Conditioning:
    """The UNet's text conditioning for prompts, as the pipeline would build it (SD-1.x/2.x and SDXL)."""

    def __init__(self, pipe, prompts: list[str], negative: list[str] | None, cfg: bool, height: int, width: int,
                 clip_skip: int | None = None, cross_attention_kwargs: dict | None = None):
        device = pipe.unet.device
        self.cfg = cfg
        self.added = None
        self.cross_attention_kwargs = cross_attention_kwargs
        if hasattr(pipe, "text_encoder_2"):
            pe, ne, ppe, npe = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=cfg, negative_prompt=negative,
                                                  clip_skip=clip_skip)
            ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                         text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            ids = ids.to(device).repeat(len(prompts), 1)
            text = torch.cat([npe, ppe]) if cfg else ppe
            self.added = {"text_embeds": text, "time_ids": torch.cat([ids, ids]) if cfg else ids}
        else:
            pe, ne = pipe.encode_prompt(prompts, device, 1, cfg, negative, clip_skip=clip_skip)
        self.embeddings = torch.cat([ne, pe]) if cfg else pe

    def noise(self, unet, latents: torch.Tensor, t, guidance: float) -> torch.Tensor:
        x = torch.cat([latents, latents]) if self.cfg else latents
        out = unet(x, t, encoder_hidden_states=self.embeddings, added_cond_kwargs=self.added,
                   cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False)[0]
        if self.cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        return out


def _alpha(scheduler, t: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def _as_epsilon(output: torch.Tensor, latents: torch.Tensor, alpha: torch.Tensor, prediction_type: str):
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha.sqrt() * output + (1 - alpha).sqrt() * latents
    raise ValueError(f"APG supports epsilon and v_prediction models, not {prediction_type!r}")


@torch.no_grad()
def invert_and_regenerate(pipe, latents: torch.Tensor, neutral: list[str], full: list[str], *, gamma: float,
                          steps: int, guidance: float, height: int, width: int,
                          negative_prompt: list[str] | None = None, clip_skip: int | None = None,
                          cross_attention_kwargs: dict | None = None) -> torch.Tensor:
    """APG on clean latents ``[B, C, h, w]`` (unscaled VAE latents, as ``output_type="latent"`` returns), with the
    generation's ``clip_skip`` and ``cross_attention_kwargs`` (e.g. a LoRA ``scale``)."""
    from diffusers import DDIMScheduler

    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"APG gamma must be in [0, 1], not {gamma}")
    k = int(round(gamma * steps))
    if k == 0:
        return latents
    # Latents are not bounded to [-1, 1]: DDIM's default clip_sample (taken when converting e.g. SDXL's Euler
    # config) would clamp every predicted z0 and destroy the inversion.
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = [int(t) for t in scheduler.timesteps]  # descending
    stride = scheduler.config.num_train_timesteps // steps
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)
    prediction_type = scheduler.config.prediction_type
    unet = pipe.unet
    dtype = unet.dtype
    x = latents.to(dtype)

    extra = {"clip_skip": clip_skip, "cross_attention_kwargs": cross_attention_kwargs}
    inverse = Conditioning(pipe, neutral, None, cfg=False, height=height, width=width, **extra)
    for t in reversed(timesteps[-k:]):  # from the cleanest level upwards
        a_from, a_to = _alpha(scheduler, t - stride).to(x.device), _alpha(scheduler, t).to(x.device)
        out = inverse.noise(unet, scheduler.scale_model_input(x, t), t, 1.0).float()
        eps = _as_epsilon(out, x.float(), a_from, prediction_type)
        x0 = (x.float() - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        x = (a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps).to(dtype)

    forward = Conditioning(pipe, full, negative_prompt, cfg=guidance > 1.0, height=height, width=width, **extra)
    for t in timesteps[-k:]:
        out = forward.noise(unet, scheduler.scale_model_input(x, t), t, guidance)
        x = scheduler.step(out, t, x, eta=0.0, return_dict=False)[0]
    return x
