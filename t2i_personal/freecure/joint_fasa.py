"""FASA for MM-DiT joint attention (FLUX.1, SD3/3.5): :mod:`.fasa`'s repair, moved from UNet self-attention to the
attention in which text and image tokens attend to each other.

One joint-attention layer sees a sequence of text tokens T and image tokens I (FLUX: text first; SD3: image first).
For the personalized pass's *conditional* rows, the image queries Q_I also read the foundation's image keys/values
recorded at the same layer and step:

    out_I = softmax( [Q_I K_ownᵀ / √d,  Q_I K_fᵀ / √d + B] ) · [V_own; V_f],   K_own = [K_T; K_I] (layer's order),
    B = +ω where the attribute mask M(key) = 1,  −∞ where M(key) = 0  (added after the 1/√d scaling, as in SDPA),

with K and V exactly what the layer's attention uses: after the q/k RMS norms and, for FLUX, after RoPE (the
foundation's image keys carry the same grid positions, so a personalized query at p sees the foundation's token at
p at relative offset 0). Text queries, unconditional rows and every foundation row are plain joint attention, and a
sample whose mask is empty is routed to the stock attention call, so its output is bit-identical to the stock model.

Passes (as :mod:`.fasa`): the foundation runs first with ``state.start("record")`` (plain attention; the
conditional rows' image K/V of the chosen layers are cached per ``(layer, step)``), then the personalized model
with ``state.start("repair")``. A forward pre-hook on the transformer (:meth:`JointFasaState.attach`) counts steps
and reads the text length the single-stream blocks need.

Layers and steps (this project's choice; the released FreeCure code has no DiT version, and the paper's FLUX
settings are not public). FreeCure repairs appearance at the end of the UNet decoder (SDXL: the last 20 of 70
transformer blocks, at the two highest resolutions). A DiT has no resolution hierarchy, so the analogue is depth:

* FLUX.1: every single-stream block (38 of the 57 blocks). Single blocks attend over [text; image] in one sequence;
  the image part is the last ``N_image`` tokens. Calibrated on the toy world's FLUX model
  (``benchmarks/toyworld_freecure.py --base builtin:toy-flux``, 2 double + 4 single blocks, 40 prompts asking for a
  hair colour the tuned model gets right in 0.175 of them): FASA on the second half of the single blocks (the first
  guess, by analogy with SDXL's 20 of 70) gave the asked hair in 0.10 at ω = 1, on every single block 0.60–0.63
  (0.825 at ω = 2); on the double blocks alone, in a 10-prompt sweep on an earlier toy model, 1 in 10.
* FLUX.1, steps: from a quarter of the sampling steps on (``FreeCureDefaults.fasa_start`` = 0.25; the released code
  acts at every step). On the toy model a repair from the first step changed the picture outside the mask twice as
  much (mean |Δ| 20.0 of 255 against 11.0 at ω = 1, every single block), at times redrawing the background (a city
  street became a wooden floor), and repaired no more often (0.600 against 0.625). A flow-matching model sets the
  layout in its first, high-noise steps; the attribute's colour and shape still form after them.
* SD3/3.5: the last third of the joint blocks (8 of 24 for SD3-medium, 13 of 38 for SD3.5-large), at every step:
  no toy SD3 model to calibrate on, so the first guess stands. SD3.5's second image-only self-attention
  (``attn2``, dual attention) is left alone.

Cache size: per image, layer and step 2·N·C values (K and V); nothing is kept for the steps before ``fasa_start``.
FLUX.1 at 1024² (N = 4096, C = 3072, bf16) is 50 MB, ×38 layers ×21 of 28 steps ≈ 40 GB: pass
``cache_device="cpu"`` unless the accelerator has room. SD3-medium (C = 1536, 8 layers, 28 steps) ≈ 5.6 GB;
SD3.5-large (C = 2432, 13 layers) ≈ 14.5 GB.

ω (:data:`DEFAULT_JOINT_OMEGA` = 1.0, calibrated on the toy FLUX model only): a foundation key inside
the mask weighs e^ω times a personalized key of the same similarity, so for a query whose own key and the
foundation's key at the same position match equally, ω = 1 gives the foundation about 73 % of that pair (0.5: 62 %,
1.5: 82 %). The released values are 0.5 (SD-1.4, 6 layers) and 1.5 (SDXL, 20 layers); 1.0 sits between them for a
layer count like SDXL's, starting weaker because joint attention also spends mass on the text keys and FLUX's
RoPE already makes the aligned foundation key the best match of a query whose content is close.

Masks from attention (:class:`JointAttentionMaps`, the joint analogue of :class:`.masks.CrossAttentionRecorder`):
the conditional image queries' softmax over *all* keys (text and image), read at the attribute's text tokens,
averaged over heads, calls (steps) and the chosen layers: FLUX's double-stream blocks of the second half (text still
has its own stream there), SD3's middle third. Also a project choice, to be calibrated.

Rows: ``batch`` images per call; a call with ``2·batch`` rows is CFG, ``[uncond; cond]`` (SD3); a call with
``batch`` rows is all conditional (FLUX-dev: guidance-distilled, no CFG batch). A call whose timestep equals the
previous call's is an extra call of the same step (FLUX's true CFG negative pass, SD3's skip-layer-guidance pass):
it does not advance the step, records nothing and runs plain.

Deviations, beyond :mod:`.fasa`'s: the mask is per sample at token resolution (FLUX: one value per 2×2 packed latent
cell; SD3: per patch), a cell counting when at least half of it is inside; samples with an empty mask skip FASA
entirely instead of attending with an all −∞ foundation block. One property does not carry over: in a UNet, a whole
mask with personalized = foundation is a no-op (each image key appears twice, weights e^s·(1 + e^ω), and the softmax
cancels the factor). Here the text keys are not duplicated, so inside the mask the image queries also give the text
1/(1 + e^ω)-fold less weight relative to the image (the foundation's image tokens already carry its text through
the earlier layers).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fasa import FasaState, match_layers

DEFAULT_JOINT_OMEGA = 1.0


# ------------------------------------------------------------------------------------------------------ models


def model_kind(transformer) -> str:
    """``"flux"`` or ``"sd3"``."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    raise TypeError("joint FASA knows FluxTransformer2DModel and SD3Transformer2DModel, not "
                    f"{type(transformer).__name__}")


def token_patch(transformer) -> int:
    """Latent cells per image token along each side: FLUX packs 2×2 latent cells in its pipeline (the transformer's
    own ``patch_size`` is 1); SD3 patchifies by ``patch_size``."""
    return 2 if model_kind(transformer) == "flux" else int(transformer.config.patch_size)


def token_grid(transformer, height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """The image-token grid of a ``height``×``width`` pixel image, in the transformer's row-major token order."""
    patch = token_patch(transformer)
    if model_kind(transformer) == "flux":  # FluxPipeline: latent side 2·(pixels // (vae·2)), then 2×2 packing
        return height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    return height // vae_scale_factor // patch, width // vae_scale_factor // patch


def mask_to_tokens(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ``[B, 1, h, w]`` (or ``[B, h, w]``) pixel- or latent-space mask as ``[B, 1, H_t, W_t]`` in {0, 1} at token
    resolution (:func:`token_grid`): a token is inside when at least half of its area is."""
    mask = mask if mask.ndim == 4 else mask[:, None]
    return (F.adaptive_avg_pool2d(mask.float(), grid) >= 0.5).float()


def joint_attention_names(transformer) -> list[str]:
    """The joint text-image attention modules, in forward order (SD3.5's image-only ``attn2`` excluded)."""
    if model_kind(transformer) == "flux":
        return [n for n, _ in transformer.named_modules() if n.startswith(("transformer_blocks.",
                "single_transformer_blocks.")) and n.endswith(".attn")]
    return [n for n, _ in transformer.named_modules() if n.startswith("transformer_blocks.") and n.endswith(".attn")]


def _blocks(transformer, group: str) -> list[str]:
    return [n for n in joint_attention_names(transformer) if n.startswith(group + ".")]


def default_joint_layers(transformer) -> list[str]:
    """FASA's layers (module docstring): FLUX, every single-stream block; SD3, the last third of the joint blocks."""
    if model_kind(transformer) == "flux":
        return _blocks(transformer, "single_transformer_blocks")
    joint = _blocks(transformer, "transformer_blocks")
    return joint[len(joint) - math.ceil(len(joint) / 3):]


def default_map_layers(transformer) -> list[str]:
    """Where attribute maps are read: FLUX, the double-stream blocks of the second half; SD3, the middle third."""
    double = _blocks(transformer, "transformer_blocks")
    if model_kind(transformer) == "flux":
        return double[len(double) // 2:]
    n = len(double)
    return double[n // 3:max(2 * n // 3, n // 3 + 1)]


def resolve_joint_layers(transformer, layers) -> list[str]:
    """``None``/"default" -> :func:`default_joint_layers`; else module names or glob patterns
    (``single_transformer_blocks.3*``), each matching at least one joint-attention module."""
    if layers is None or layers == "default":
        return default_joint_layers(transformer)
    every = joint_attention_names(transformer)
    return match_layers(every, [layers] if isinstance(layers, str) else layers,
                        f"joint attention module; they are e.g. {every[-3:]}")


# ------------------------------------------------------------------------------------------------------- state


@dataclass
class JointFasaState(FasaState):
    """:class:`.fasa.FasaState` for a DiT: one per generation, shared by the processors of both passes.

    ``masks``: ``[batch, 1, h, w]`` in {0, 1} at latent resolution, as for the UNet; ``patch`` (:func:`token_patch`)
    brings them to tokens. Token-resolution masks work too, with ``patch=1``. The step counter, the text length and
    the extra-call flag come from :meth:`attach`'s pre-hook.
    """

    patch: int = 1
    text_tokens: int | None = None
    extra_call: bool = False
    _last_timestep: torch.Tensor | None = None
    _tokens: tuple | None = None  # (masks it was made from, [batch, N] token masks, samples with a non-empty mask)

    @classmethod
    def for_transformer(cls, transformer, batch: int, omega: float = DEFAULT_JOINT_OMEGA, **fields):
        """A state whose ``patch`` fits ``transformer`` (latent-resolution masks)."""
        return cls(omega=omega, batch=batch, patch=token_patch(transformer), **fields)

    def attach(self, transformer):
        """Register the step counter on ``transformer``; returns the hook handle (``.remove()`` it)."""
        return transformer.register_forward_pre_hook(self.next_step, with_kwargs=True)

    def next_step(self, module, args, kwargs=None) -> None:
        inputs = inspect.signature(module.forward).bind_partial(*args, **(kwargs or {})).arguments
        if inputs.get("encoder_hidden_states") is None:
            raise RuntimeError("joint FASA needs the transformer's encoder_hidden_states: register the hook with "
                               "JointFasaState.attach (with_kwargs=True)")
        self.text_tokens = inputs["encoder_hidden_states"].shape[1]
        timestep = inputs.get("timestep")
        timestep = None if timestep is None else timestep.detach().float().flatten().cpu()
        self.extra_call = (self.step >= 0 and timestep is not None and self._last_timestep is not None
                           and torch.equal(timestep, self._last_timestep))
        if not self.extra_call:
            self.step += 1
        self._last_timestep = timestep

    def start(self, mode: str) -> None:
        super().start(mode)
        self.extra_call, self._last_timestep = False, None

    def conditional_rows(self, rows: int) -> slice:
        return slice(rows, rows) if self.extra_call else super().conditional_rows(rows)

    def repaired_samples(self, image_tokens: int) -> list[int]:
        """The samples with a non-empty mask (computed once per ``masks`` object)."""
        if self.masks is None:
            return []
        if self._tokens is None or self._tokens[0] is not self.masks:
            h, w = self.masks.shape[-2:]
            tokens = mask_to_tokens(self.masks, (h // self.patch, w // self.patch)).flatten(1)
            self._tokens = (self.masks, tokens, [i for i, inside in enumerate(tokens.any(1).tolist()) if inside])
        tokens = self._tokens[1]
        if tokens.shape[1] != image_tokens:
            raise RuntimeError(f"the FASA masks give {tokens.shape[1]} image tokens ({tuple(self.masks.shape[-2:])} "
                               f"latent cells, patch {self.patch}), the layer has {image_tokens}")
        return self._tokens[2]

    def foundation_bias(self, samples: list[int], own_keys: int, dtype, device) -> torch.Tensor:
        """``[len(samples), 1, 1, own_keys + N]``: 0 on own keys; foundation keys ω inside the mask, −∞ outside."""
        inside = self._tokens[1][samples].to(device) > 0.5
        foundation = torch.where(inside, torch.tensor(self.omega, device=device),
                                 torch.tensor(-math.inf, device=device))
        own = torch.zeros(len(samples), own_keys, device=device)
        return torch.cat([own, foundation], dim=1)[:, None, None, :].to(dtype)

    def keep(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """Cache the foundation's image K/V of this layer and step (copies: never a view of the whole batch)."""
        kept = tuple(t.detach().to(self.cache_device, copy=True) if self.cache_device is not None
                     else t.detach().clone() for t in (key, value))
        self.cache[(name, self.step)] = kept

    def foundation(self, name: str, samples: list[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            key, value = self.cache[(name, self.step)]
        except KeyError:
            raise RuntimeError(f"no foundation keys/values for {name} at step {self.step}: the foundation pass must "
                               "run first, with the same layers and number of steps") from None
        index = torch.tensor(samples, device=key.device)
        return tuple(t[index].to(device=like.device, dtype=like.dtype, non_blocking=True) for t in (key, value))


# ------------------------------------------------------------------------------------------------ attention maps


class JointAttentionMaps:
    """Image-query → text-key attention probabilities (softmax over all keys, text and image), averaged over heads,
    of the conditional rows, summed per layer over calls: ``sums[name]`` is ``[batch, N_image, N_text]``."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    @torch.no_grad()
    def add(self, name: str, image_query: torch.Tensor, key: torch.Tensor, text: slice) -> None:
        """``image_query`` ``[b, heads, N_image, d]``, ``key`` ``[b, heads, N_all, d]`` (after norm and RoPE)."""
        heads, scale = image_query.shape[1], image_query.shape[-1] ** -0.5
        probs = 0
        for h in range(heads):  # one head at a time: N_image × N_all float32 logits are the big intermediate
            logits = image_query[:, h].float() @ key[:, h].float().transpose(-1, -2) * scale
            probs = probs + logits.softmax(-1)[..., text]
        self.sums[name] = self.sums.get(name, 0) + probs / heads
        self.calls[name] = self.calls.get(name, 0) + 1

    def heatmap(self, positions, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, H_t, W_t]``: per image, the attention its image tokens pay to its text ``positions`` (one list for
        every image, or one list per image), summed over them, averaged over steps and layers."""
        if not self.sums:
            raise RuntimeError("no attention was recorded: install the map layers' processors for the foundation pass")
        layers = [total / self.calls[name] for name, total in self.sums.items()]
        batch = layers[0].shape[0]
        positions = _per_image(positions, batch)
        heat = torch.stack([torch.stack([layer[i][:, positions[i]].sum(-1) for i in range(batch)])
                            for layer in layers]).mean(0)
        return heat.view(batch, *grid)

    def mask(self, positions, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, 1, H_t, W_t]`` in {0, 1}: the min-max normalised :meth:`heatmap`, Otsu-thresholded per image (as
        :func:`.masks.cross_attention_mask`); an image without positions gets an empty mask."""
        from .masks import otsu_threshold

        heat = self.heatmap(positions, grid)
        out = torch.zeros_like(heat)
        for i, image_positions in enumerate(_per_image(positions, heat.shape[0])):
            if not image_positions:
                continue
            lo, hi = heat[i].min(), heat[i].max()
            norm = (heat[i] - lo) / (hi - lo).clamp(min=1e-12)
            out[i] = (norm > otsu_threshold(norm)).float()
        return out[:, None]


def _per_image(positions, batch: int) -> list[list[int]]:
    """One list of text positions per image, from one shared list or one per image."""
    if positions and isinstance(positions[0], int):
        return [list(positions)] * batch
    return [list(p) for p in positions]


def text_token_positions(tokenizer, prompt: str, phrase: str, offset: int = 0) -> list[int]:
    """Where ``phrase``'s tokens sit in the text sequence of the joint attention, or ``[]``. FLUX: the T5 tokenizer
    (``tokenizer_2``), ``offset`` 0. SD3: the CLIP tokenizer, offset 0 (its 77 CLIP tokens come first), or the T5
    tokenizer (``tokenizer_3``), offset 77."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    sub = tokenizer(phrase, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(sub) + 1):
        if sub and ids[start:start + len(sub)] == sub:
            return list(range(offset + start, offset + start + len(sub)))
    return []


# ------------------------------------------------------------------------------------------------ processors


class _JointFasaProcessor:
    """What FLUX's and SD3's processors share: FASA on the image queries, in the ``[B, heads, S, d]`` layout."""

    _attention_backend = None  # set by diffusers' set_attention_backend, honoured by FLUX's plain path
    _parallel_config = None

    def __init__(self, name: str, state: JointFasaState, fasa: bool = True, maps: JointAttentionMaps | None = None):
        self.name, self.state, self.fasa, self.maps = name, state, fasa, maps

    def _plain(self, query, key, value, attention_mask=None):
        raise NotImplementedError

    def _attend(self, query, key, value, image: slice, text: slice, attention_mask=None) -> torch.Tensor:
        """``[B, heads, S, d]`` in, the attention out; ``image``/``text``: where each sits in the sequence."""
        state = self.state
        cond = state.conditional_rows(query.shape[0])
        has_cond = cond.start < cond.stop
        if self.maps is not None and has_cond:
            self.maps.add(self.name, query[cond, :, image], key[cond], text)
        if self.fasa and state.mode == "record" and has_cond and state.acting:
            state.keep(self.name, key[cond, :, image], value[cond, :, image])
        repairing = self.fasa and state.mode == "repair" and has_cond and state.acting
        samples = state.repaired_samples(len(range(query.shape[2])[image])) if repairing else []
        if not samples:
            return self._plain(query, key, value, attention_mask)
        if attention_mask is not None:
            raise RuntimeError(f"joint FASA does not combine with an attention mask ({self.name})")

        # each output once: rows without a mask through the stock call, the repaired rows' text queries plainly,
        # their image queries through FASA
        rows = [cond.start + i for i in samples]
        others = [r for r in range(query.shape[0]) if r not in rows]
        out = torch.empty_like(query)
        if others:
            out[others] = self._plain(query[others], key[others], value[others])
        q, k, v = query[rows], key[rows], value[rows]
        found_key, found_value = state.foundation(self.name, samples, like=k)
        bias = state.foundation_bias(samples, k.shape[2], q.dtype, q.device)
        repaired = torch.empty_like(q)
        repaired[:, :, text] = self._plain(q[:, :, text], k, v)
        repaired[:, :, image] = F.scaled_dot_product_attention(
            q[:, :, image], torch.cat([k, found_key], dim=2), torch.cat([v, found_value], dim=2), attn_mask=bias)
        out[rows] = repaired
        return out


class FluxJointFasaProcessor(_JointFasaProcessor):
    """For ``FluxAttention`` (double-stream: image ``hidden_states`` + text ``encoder_hidden_states``; single-stream:
    one ``[text; image]`` sequence). Mirrors diffusers' ``FluxAttnProcessor`` step by step."""

    def _plain(self, query, key, value, attention_mask=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # back to FLUX's [B, S, heads, d]
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        return out.transpose(1, 2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if encoder_hidden_states is not None:  # double-stream block
            text_tokens = encoder_hidden_states.shape[1]
        elif self.state.text_tokens is not None:  # single-stream block: [text; image]
            text_tokens = self.state.text_tokens
        else:
            raise RuntimeError(f"{self.name} is a single-stream block: attach the JointFasaState to the transformer "
                               "so it knows the text length")
        out = self._attend(*(t.transpose(1, 2) for t in (query, key, value)), image=slice(text_tokens, None),
                           text=slice(0, text_tokens), attention_mask=attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text_tokens, hidden_states.shape[1] - text_tokens], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states


class SD3JointFasaProcessor(_JointFasaProcessor):
    """For SD3's joint ``Attention`` (``[image; text]``). Mirrors diffusers' ``JointAttnProcessor2_0``."""

    def _plain(self, query, key, value, attention_mask=None):
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.name}: joint FASA needs the joint attention (text tokens), not attn2")
        batch, image_tokens = hidden_states.shape[:2]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query, text_key, text_value = (heads(attn.add_q_proj(encoder_hidden_states)),
                                            heads(attn.add_k_proj(encoder_hidden_states)),
                                            heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)

        out = self._attend(query, key, value, image=slice(0, image_tokens), text=slice(image_tokens, None))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


# -------------------------------------------------------------------------------------------------- install


def joint_fasa_processors(transformer, state: JointFasaState, layers=None, maps: JointAttentionMaps | None = None,
                          map_layers=None) -> dict[str, _JointFasaProcessor]:
    """``{module name: processor}``: FASA on ``layers`` (:func:`resolve_joint_layers`), and, when ``maps`` is
    given, attention maps on ``map_layers`` (default :func:`default_map_layers`); a module in both does both."""
    processor = FluxJointFasaProcessor if model_kind(transformer) == "flux" else SD3JointFasaProcessor
    fasa_layers = resolve_joint_layers(transformer, layers)
    map_layers = [] if maps is None else (default_map_layers(transformer) if map_layers is None
                                          else resolve_joint_layers(transformer, map_layers))
    names = fasa_layers + [n for n in map_layers if n not in fasa_layers]
    return {n: processor(n, state, fasa=n in fasa_layers, maps=maps if n in map_layers else None) for n in names}


@contextmanager
def installed(transformer, processors: dict, state: JointFasaState):
    """Swap in ``processors`` (other modules keep theirs) and count transformer calls as steps; restore on exit."""
    modules = {name: transformer.get_submodule(name) for name in processors}
    original = {name: module.processor for name, module in modules.items()}
    for name, module in modules.items():
        module.set_processor(processors[name])
    hook = state.attach(transformer)
    try:
        yield
    finally:
        hook.remove()
        for name, module in modules.items():
            module.set_processor(original[name])
