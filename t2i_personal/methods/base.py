"""The interface between the trainer and a personalization method.

The trainer runs the denoising forward pass and knows nothing of papers. A method says which prior examples it
trains with (``prior_examples``), which parameters train and at which learning rates (``prepare`` +
``trainable_parameters``), which loss terms it adds (``loss_terms`` returns named terms that the trainer sums
and logs by key), what an export holds (``export_components``) and how its result is written and read back
(``save`` / ``load_into``).

Two add-ons compose with any method and are handed to it by ``build_method``: learned tokens
(``methods/tokens.py``: concepts with an ``initializer_token``) and ClassDiffusion's semantic preservation loss
(``methods/classdiffusion.py``: ``method.spl``). Subclasses override the ``configure`` / ``parameter_groups`` /
``denoising_terms`` / ``save_artifact`` / ``load_artifact`` halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..families import Conditioning
from ..models.components import Components
from .tokens import LearnedTokens


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


@dataclass
class LearningRates:
    """The learning rate of each kind of parameter (``TrainingConfig.learning_rates`` fills the defaults)."""

    denoiser: float
    text_encoder: float
    tokens: float


class Method:
    """Base class: subclasses override what differs. ``components`` are the unwrapped modules."""

    name = "base"

    def __init__(self, config, tokens: LearnedTokens | None = None, spl=None):
        self.config = config
        self.trained: list[str] = []  # components holding trainable parameters, set by ``prepare``
        self.own: list[str] = []
        self.tokens = tokens if tokens is not None else LearnedTokens(())
        self.spl = spl

    @property
    def addons(self) -> list:
        return [a for a in (self.tokens, self.spl) if a]

    def check(self, components: Components, training=None) -> None:
        """Refuse, before anything is written, what cannot work with these components (and ``training``, a
        TrainingConfig, when given)."""
        for addon in self.addons:
            addon.check(components)

    @property
    def trains_text_side(self) -> bool:
        """Whether any text-encoder parameter (a full encoder, its LoRA or a learned token row) trains."""
        return bool(self.tokens) or bool(getattr(self.config, "train_text_encoder", False))

    # ------------------------------------------------------------------ data

    def prior_examples(self, instances: list, class_images: Callable[[int], list]) -> list[list] | None:
        """Per concept, the prior samples trained beside its instances (None: no prior term).
        ``class_images(concept_index)`` supplies (generating if needed) that concept's class images."""
        return None

    # ------------------------------------------------------------------ what trains

    def add_tokens(self, components: Components) -> None:
        """Add the learned identifiers to the tokenizers (before any prompt is tokenized)."""
        if self.tokens:
            self.tokens.add_to(components)

    def prepare(self, components: Components) -> None:
        """Freeze everything, then make trainable (and inject adapters into) what this method trains."""
        for module in components.modules.values():
            module.requires_grad_(False)
        self.configure(components)
        self.own = list(self.trained)  # what the method itself trains; ``trained`` also lists encoders holding tokens
        if self.tokens:
            for row in self.tokens.parameters(components):
                row.requires_grad_(True)
            self.trained += [n for n in components.token_text_encoder_names if n not in self.trained]

    def configure(self, components: Components) -> None:
        """Make trainable what the method itself trains and set ``self.trained``."""

    def trainable_parameters(self, components: Components, lrs: LearningRates) -> list[dict]:
        """Optimizer groups ``{"name", "params", "lr"}``."""
        token_rows = {id(p) for p in self.tokens.parameters(components)} if self.tokens else set()
        groups = []
        for g in self.parameter_groups(components, lrs):
            params = [p for p in g["params"] if id(p) not in token_rows]  # a full text encoder also holds them
            if params:
                groups.append({**g, "params": params})
        if self.tokens:
            groups.append({"name": "tokens", "params": self.tokens.parameters(components), "lr": lrs.tokens})
        return groups

    def parameter_groups(self, components: Components, lrs: LearningRates) -> list[dict]:
        return []

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Extra frozen modules the method owns (e.g. a reference copy); the trainer places and casts them."""
        return []

    # ------------------------------------------------------------------ loss

    def loss_terms(self, step: TrainStep, components: Components) -> dict[str, torch.Tensor]:
        terms = self.denoising_terms(step, components)
        if self.spl:
            terms["spl"] = self.spl(components, [getattr(components, n) for n in self.trained if n.startswith("text_encoder")])
        return terms

    def denoising_terms(self, step: TrainStep, components: Components) -> dict[str, torch.Tensor]:
        instance = ~step.is_prior
        mask = None if step.loss_mask is None else step.loss_mask[instance]
        return {"denoise": weighted_mse(step.model_pred[instance], step.target[instance], step.loss_weights[instance],
                                        mask)}

    # ------------------------------------------------------------------ checkpoints

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

    # ------------------------------------------------------------------ artifacts

    def exported_components(self) -> list[str]:
        """Components whose weights ``save`` writes (an adapter file writes none of the base weights)."""
        return ["unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]

    def export_components(self, components: Components, float32_base: Callable[[list[str]], dict]) -> Components:
        """Components as an export should read them: modules the export writes that were cast for mixed precision
        but did not train come from ``float32_base(names)`` (float32 copies of the base), so exports never hold
        degraded weights. A text encoder that only holds learned token rows gets those rows put in."""
        cast = [n for n in self.exported_components() if getattr(components, n) is not None
                and n not in self.own and any(p.dtype != torch.float32 for p in getattr(components, n).parameters())]
        if not cast:
            return components
        pristine = float32_base(cast)
        for name in cast:
            if name in self.trained:
                self.tokens.transplant(getattr(components, name), pristine[name])
        return replace(components, **pristine)

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
        artifact = record["artifact"]
        if artifact.get("tokens") and artifact["type"] != "pipeline":  # a saved pipeline already has them
            LearnedTokens.load(pipeline, folder, artifact["tokens"])
        return cls.load_artifact(pipeline, folder, record)

    @classmethod
    def load_artifact(cls, pipeline, folder: Path, record: dict):
        raise NotImplementedError
