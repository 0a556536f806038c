"""The interface between the trainer and a personalization method.

The trainer runs the denoising forward pass and knows nothing of papers. A method says which parameters train
(``prepare`` + ``trainable_parameters``), which loss terms it adds (``loss_terms`` returns named terms that the
trainer sums and logs by key) and how its result is written and read back (``save`` / ``load_into``).

Two add-ons compose with every method, so they live here rather than in each subclass: learned tokens
(``methods/tokens.py``: concepts with an ``initializer_token``) and ClassDiffusion's semantic preservation loss
(``methods/classdiffusion.py``: ``method.spl``). Subclasses override the ``configure`` / ``parameter_groups`` /
``denoising_terms`` / ``save_artifact`` / ``load_artifact`` halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.components import Components


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL
    time_ids: torch.Tensor | None = None  # SDXL

    def select(self, mask: torch.Tensor) -> "Conditioning":
        pick = lambda x: None if x is None else x[mask]  # noqa: E731
        return Conditioning(self.encoder_hidden_states[mask], pick(self.pooled), pick(self.time_ids))


def denoise(unet, noisy_latents, timesteps, cond: Conditioning) -> torch.Tensor:
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return unet(noisy_latents, timesteps, encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=added, return_dict=False)[0]


@dataclass
class TrainStep:
    """Everything the trainer computed for one micro-batch; methods read what they need."""

    model_pred: torch.Tensor
    target: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    input_ids: list[torch.Tensor]  # per tokenizer
    is_prior: torch.Tensor  # bool [B]
    loss_weights: torch.Tensor  # per-sample weights [B] (min-SNR), ones otherwise
    extras: dict = field(default_factory=dict)
    # [B, 1, h, w] or [B, h, w] at latent resolution (data.rescale_augmentation): the loss only counts where it is 1
    loss_mask: torch.Tensor | None = None


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples of ``weight * mean((pred - target)^2)``; the loss is computed in float32.

    With ``mask`` ([B, 1, h, w] or [B, h, w], broadcast over channels) the per-sample mean is taken over the
    masked region only: ``sum(err * mask) / sum(mask)`` per sample, a true mean over every masked element (the
    official Custom Diffusion script divides by the mask's spatial sum only, i.e. C times this). A sample whose
    mask is empty contributes 0."""
    err = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, pred.ndim))
    if mask is None:
        per_sample = err.mean(dim=dims)
    else:
        mask = mask.to(device=err.device, dtype=err.dtype)
        if mask.ndim == err.ndim - 1:
            mask = mask.unsqueeze(1)
        mask = mask.expand_as(err)
        per_sample = (err * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(torch.finfo(err.dtype).tiny)
    return (per_sample * weights).mean()


class Method:
    """Base class: subclasses override what differs. ``components`` are the unwrapped modules."""

    name = "base"

    def __init__(self, config, concepts=()):
        from .classdiffusion import SemanticPreservationLoss
        from .tokens import LearnedTokens

        self.config = config
        self.trained: list[str] = []  # components holding trainable parameters, set by ``prepare``
        self.own: list[str] = []
        self.tokens = LearnedTokens(concepts)
        self.spl = SemanticPreservationLoss(config.spl, concepts) if getattr(config, "spl", None) else None

    def check(self, components: Components) -> None:
        """Refuse, before anything is written, what cannot work with these components."""
        if self.tokens:
            self.tokens.check(components)
        if self.spl is not None:
            self.spl.check(components)

    def add_tokens(self, components: Components) -> None:
        """Add the learned identifiers to the tokenizers (before any prompt is tokenized)."""
        if self.tokens:
            self.tokens.add_to(components)

    def prepare(self, components: Components) -> None:
        """Freeze everything, then make trainable (and inject adapters into) what this method trains."""
        for module in (components.unet, components.vae, *components.text_encoders):
            module.requires_grad_(False)
        self.configure(components)
        self.own = list(self.trained)  # what the method itself trains; ``trained`` also lists encoders holding tokens
        if self.tokens:
            for row in self.tokens.parameters(components):
                row.requires_grad_(True)
            self.trained += [n for n in ("text_encoder", "text_encoder_2")
                             if getattr(components, n) is not None and n not in self.trained]

    def configure(self, components: Components) -> None:
        """Make trainable what the method itself trains and set ``self.trained``."""

    def trainable_parameters(self, components: Components, lr: float, text_encoder_lr: float,
                             token_lr: float | None = None) -> list[dict]:
        token_rows = {id(p) for p in self.tokens.parameters(components)} if self.tokens else set()
        groups = []
        for g in self.parameter_groups(components, lr, text_encoder_lr):
            params = [p for p in g["params"] if id(p) not in token_rows]  # a full text encoder also holds them
            if params:
                groups.append({**g, "params": params})
        if self.tokens:
            groups.append({"name": "tokens", "params": self.tokens.parameters(components), "lr": token_lr or lr})
        return groups

    def parameter_groups(self, components: Components, lr: float, text_encoder_lr: float) -> list[dict]:
        return []

    def loss_terms(self, step: TrainStep, components: Components) -> dict[str, torch.Tensor]:
        terms = self.denoising_terms(step, components)
        if self.spl is not None:
            terms["spl"] = self.spl(components, [getattr(components, n) for n in self.trained if n.startswith("text_encoder")])
        return terms

    def denoising_terms(self, step: TrainStep, components: Components) -> dict[str, torch.Tensor]:
        instance = ~step.is_prior
        mask = None if step.loss_mask is None else step.loss_mask[instance]
        return {"denoise": weighted_mse(step.model_pred[instance], step.target[instance], step.loss_weights[instance],
                                        mask)}

    def trainable_state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        """Every trainable tensor, keyed ``component.param_name`` (what a resumable checkpoint must hold)."""
        state = {}
        for name in self.trained:
            for pname, p in getattr(components, name).named_parameters():
                if p.requires_grad:
                    state[f"{name}.{pname}"] = p.detach()
        return state

    def load_trainable_state_dict(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        expected = self.trainable_state_dict(components)
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this method's trainable parameters: "
                             f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {sorted(unexpected)[:3]})")
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(state[key])

    def exported_components(self) -> list[str]:
        """Components whose weights ``save`` writes (an adapter file writes none of the base weights)."""
        return ["unet", "vae", "text_encoder", "text_encoder_2"]

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Extra frozen modules the method owns (e.g. a reference copy); the trainer places and casts them."""
        return []

    def save(self, components: Components, out_dir: Path, export) -> dict:
        """Write the inference artifact into ``out_dir`` as ``export`` (an ExportConfig) asks; return its
        description for personalization.json."""
        artifact = self.save_artifact(components, out_dir, export)
        if self.tokens:
            artifact["tokens"] = self.tokens.save(components, out_dir, getattr(torch, export.save_dtype))
        return artifact

    def save_artifact(self, components: Components, out_dir: Path, export) -> dict:
        raise NotImplementedError

    @classmethod
    def load_into(cls, pipeline, folder: Path, record: dict):
        """Apply a saved artifact to a base pipeline (inverse of ``save``); return the pipeline."""
        from .tokens import LearnedTokens

        artifact = record["artifact"]
        if artifact.get("tokens") and artifact["type"] != "pipeline":  # a saved pipeline already has them
            LearnedTokens.load(pipeline, folder, artifact["tokens"])
        return cls.load_artifact(pipeline, folder, record)

    @classmethod
    def load_artifact(cls, pipeline, folder: Path, record: dict):
        raise NotImplementedError

