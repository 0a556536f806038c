"""FASA, Foundation-Aware Self-Attention (FreeCure v2, Cai et al. 2025), as a diffusers attention processor.

For a chosen self-attention layer (``attn1``) the personalized model's *conditional* queries Q_p attend jointly to
their own keys/values and to the foundation's keys/values recorded at the same layer and step:

    FASA(p, f) = softmax( [Q_p K_pᵀ, Q_p K_fᵀ + B] / √d ) · [V_p; V_f],
    B = +ω where the attribute mask M(key) = 1,  −∞ where M(key) = 0.

This is the additive form of the released code (github.com/YIYANGCAI/FreeCure): the paper's figure writes
a multiplicative ``[1, ωM] ⊙`` on the logits, which read literally would give masked-out foundation keys logit 0
instead of excluding them. With an empty mask B is −∞ everywhere and FASA is exactly ordinary self-attention.
The unconditional rows and every foundation row are plain attention.

Deviations from the released code, and why:

* one processor per chosen ``attn1`` module (``set_attn_processor``), not a monkey-patched ``forward`` on every
  ``Attention``: the released hook also replaces cross-attention, which silently drops IP-Adapter / Custom
  Diffusion / other ``attn2`` processors;
* the layer is bound by name at install time and the step comes from a UNet pre-forward hook; the released code
  counts calls and never resets, so a second generation with the same object silently ran without FASA. Each
  generation here gets a fresh :class:`FasaState`;
* the foundation runs *once*, before the personalized pass, and its conditional K/V are cached
  (``mode="record"``); the personalized pass then runs alone (``mode="repair"``): about 2× a plain generation
  instead of the released two dual passes (≈4×);
* ``scaled_dot_product_attention`` with a float ``[B, 1, 1, 2N]`` mask instead of materialised N×N einsums.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

def family_defaults(unet):
    """FreeCure's settings for the model family of ``unet`` (``t2i_personal/families``)."""
    from ..errors import ConfigError
    from ..families import family_of_denoiser  # not at import time: importing freecure stays light

    family = family_of_denoiser(unet)
    if family.freecure is None:
        raise ConfigError(f"FreeCure has no settings for {family.name} models")
    return family.freecure


# ------------------------------------------------------------------------------------------------------ layers


def decoder_self_attention_names(unet) -> list[str]:
    """``attn1`` modules of the decoder (``up_blocks``), in forward order."""
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks.") and n.endswith(".attn1")]


def default_layers(unet) -> list[str]:
    """The released code's layers, by name.

    SD 1.x: ``layer_idx`` 10-15 of 16 = the self-attentions of the last two decoder blocks that have attention
    (``up_blocks.2`` at 32² and ``up_blocks.3`` at 64² for a 512² SD-1.5). SDXL: the last 20 decoder transformer
    blocks (``up_blocks.0.attentions.1.transformer_blocks.6`` onwards and all of ``up_blocks.1``). Smaller UNets
    (the tiny test models, the toy world) get the same rule applied to what they have.
    """
    names = decoder_self_attention_names(unet)
    last = family_defaults(unet).fasa_decoder_blocks
    if last is not None:
        return names[-last:]
    blocks = sorted({int(n.split(".")[1]) for n in names})[-2:]
    return [n for n in names if int(n.split(".")[1]) in blocks]


def resolve_layers(unet, layers) -> list[str]:
    """``None``/"default" -> :func:`default_layers`; else module names or glob patterns (``up_blocks.3.*``), which
    must each match at least one ``attn1``."""
    if layers is None or layers == "default":
        return default_layers(unet)
    if isinstance(layers, str):
        layers = [layers]
    every = [n for n, _ in unet.named_modules() if n.endswith(".attn1")]
    return match_layers(every, layers, "self-attention (attn1) module of this UNet; decoder self-attentions are e.g. "
                        f"{decoder_self_attention_names(unet)[-3:]}")


def match_layers(every: list[str], patterns: list[str], what: str) -> list[str]:
    """The names in ``every`` that the module names or glob patterns pick, in order; a pattern that picks none is
    an error naming ``what`` it should have matched."""
    chosen: list[str] = []
    for pattern in patterns:
        pattern = pattern.removesuffix(".processor")
        hits = [n for n in every if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            from ..errors import ConfigError

            raise ConfigError(f"FreeCure layers: {pattern!r} matches no {what}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


# ------------------------------------------------------------------------------------------------- attention


@dataclass
class FasaState:
    """Everything one generation shares between its processors: fresh per call, so calls cannot leak into each other.

    ``mode``: ``"record"`` (foundation pass: plain attention, conditional K/V cached), ``"repair"`` (personalized
    pass: FASA on the conditional rows) or ``"off"`` (plain attention, nothing kept). ``batch``: images per call,
    which tells a CFG call (``2·batch`` rows, unconditional first) from one without CFG. ``masks``: ``[batch, 1,
    h, w]`` in {0, 1} at latent resolution.
    """

    omega: float
    batch: int
    masks: torch.Tensor | None = None
    cache_device: str | torch.device | None = None  # None: beside the model
    mode: str = "off"
    step: int = -1
    first_step: int = 0  # FASA records and repairs from this sampling step on (fasa_start · steps)
    cache: dict = field(default_factory=dict)
    _bias: dict = field(default_factory=dict)

    def next_step(self, *_args, **_kwargs) -> None:  # a UNet forward pre-hook: one UNet call per sampling step
        self.step += 1

    def start(self, mode: str) -> None:
        self.mode, self.step = mode, -1

    @property
    def acting(self) -> bool:
        """Whether this step records (foundation pass) or repairs (personalized pass): from ``first_step`` on."""
        return self.step >= self.first_step

    def conditional_rows(self, rows: int) -> slice:
        if rows == 2 * self.batch:
            return slice(self.batch, rows)
        if rows == self.batch:
            return slice(0, rows)
        raise RuntimeError(f"FASA expected {self.batch} or {2 * self.batch} rows (images per call, without or with "
                           f"CFG), got {rows}: the pipeline batches its UNet calls in a way FreeCure does not know")

    def key_bias(self, tokens: int, spatial_shape: tuple[int, int], dtype, device) -> torch.Tensor:
        """``[batch, 1, 1, 2N]``: 0 on own keys, ω on foundation keys inside the mask, −∞ outside it."""
        key = (tokens, dtype, device)
        if key not in self._bias:
            h, w = layer_grid(tokens, spatial_shape)
            mask = F.interpolate(self.masks.float(), size=(h, w), mode="nearest").flatten(1).to(device)  # [B, N]
            foundation = torch.where(mask > 0.5, torch.tensor(self.omega, device=device),
                                     torch.tensor(-math.inf, device=device))
            bias = torch.cat([torch.zeros_like(foundation), foundation], dim=1)
            self._bias[key] = bias[:, None, None, :].to(dtype)
        return self._bias[key]


def layer_grid(tokens: int, latent_shape: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a UNet layer with ``tokens`` positions: the latent grid halved (rounding up, as the
    UNet's stride-2 convolutions do) until it has that many cells."""
    h, w = latent_shape
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise RuntimeError(f"no UNet level of the {latent_shape[0]}×{latent_shape[1]} latent grid has {tokens} cells")
    return h, w


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


class FoundationAwareSelfAttention:
    """The processor of one chosen ``attn1`` module; ``name`` keys its cache entries."""

    def __init__(self, name: str, state: FasaState):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(f"FASA is a self-attention processor; {self.name} was called as cross-attention")
        state = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        cond = state.conditional_rows(hidden_states.shape[0])
        if state.mode == "repair" and state.masks is not None and state.acting:
            found_key, found_value = (t.to(device=key.device, dtype=key.dtype, non_blocking=True)
                                      for t in state.cache[(self.name, state.step)])
            bias = state.key_bias(key.shape[2], tuple(state.masks.shape[-2:]), query.dtype, query.device)
            repaired = F.scaled_dot_product_attention(
                query[cond], torch.cat([key[cond], found_key], dim=2),
                torch.cat([value[cond], found_value], dim=2), attn_mask=bias)
            plain = F.scaled_dot_product_attention(query[:cond.start], key[:cond.start], value[:cond.start])
            out = torch.cat([plain, repaired])  # unconditional rows first, as the pipeline stacked them
        else:
            out = F.scaled_dot_product_attention(query, key, value)
            if state.mode == "record" and state.acting:
                kept = (key[cond].detach(), value[cond].detach())
                if state.cache_device is not None:
                    kept = tuple(t.to(state.cache_device) for t in kept)
                state.cache[(self.name, state.step)] = kept

        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
