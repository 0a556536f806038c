"""ClassDiffusion's semantic preservation loss (SPL; Huang et al., ICLR 2025).

For concepts k = 1..K with identifier V_k and class noun C_k, and phrase templates T_1..T_M::

    SPL = lambda * mean_k mean_m ( 1 - cos( f(T_m(V_k, C_k)), f(T_m(-, C_k)) ) )

where f is the text encoder's final-layer hidden state after its final layer norm (no projection), taken at one
position: ``eos`` pools the true end-of-sequence token of both phrases (what the paper describes), ``argmax_id``
uses the text model's own ``pooler_output`` - for SD-1.5 configs (``eos_token_id == 2``) that is the position of
the largest token id, i.e. the new token, which is what the official code computes. The default template is the
paper's single phrase "a photo of a {V} {C}"; the class phrase drops "{V}".

The loss moves only what trains on the text side (learned token rows, a text-encoder LoRA or the full encoder);
it never reaches the UNet, so the config is rejected when nothing on the text side trains.

Deviations from the official code (``Rbrq03/ClassDiffusion``):
- SPL and prior preservation can be combined (the official script crashes when both are on).
- The new token keeps its positional embedding in the SPL pass (the official pass overwrites the token's input
  vector with the raw embedding row, dropping it); the gradient reaches the same row either way.
- SDXL, SD3, FLUX: the loss is averaged over the CLIP encoders that train (the paper covers SD-1.5 only;
  ``argmax_id``, which imitates SD-1.5's pooling, is refused with two CLIPs); T5 never trains, so SPL never
  reaches it.
- The class phrase is the target (no gradient): with a trained text encoder (LoRA or full), which the official
  setup never has, SPL would otherwise also pull the class phrase towards the personal one.
"""

from __future__ import annotations

import torch

from typing import Literal

from pydantic import Field, field_validator

from ..data.captions import render_prompt
from ..errors import ConfigError
from ..sections import Section


class SPLConfig(Section):
    """``method.spl``: ClassDiffusion's semantic preservation loss."""

    weight: float = Field(1.0, ge=0.0, description="lambda of the SPL term")
    pooling: Literal["eos", "argmax_id"] = Field("eos", description="eos: the true end-of-sequence feature (the paper); argmax_id: the text model's own pooler, which for SD-1.5 configs lands on the new token (the official code)")
    templates: list[str] = Field(["a photo of a {V} {C}"], min_length=1, description="personal phrases; the class phrase drops {V}")

    @field_validator("templates")
    @classmethod
    def _has_placeholders(cls, value: list[str]) -> list[str]:
        for t in value:
            if "{V}" not in t or "{C}" not in t:
                raise ValueError(f"template {t!r} must contain both {{V}} and {{C}}")
        return value


class SemanticPreservationLoss:
    def __init__(self, config, concepts):
        self.weight, self.pooling = config.weight, config.pooling
        self.pairs = [(render_prompt(t, c.identifier, c.class_noun), render_prompt(_drop_identifier(t), c.identifier, c.class_noun))
                      for c in concepts for t in config.templates]
        self.num_concepts = len(concepts)

    def __call__(self, components, encoders: list[torch.nn.Module]) -> torch.Tensor:
        """lambda * mean over (concept, template) pairs of 1 - cos(personal, class), averaged over ``encoders``."""
        personal, plain = zip(*self.pairs)
        losses = []
        for encoder, tokenizer in zip(components.tunable_text_encoders, components.tunable_tokenizers):
            if encoder not in encoders:
                continue
            f_personal = self.features(encoder, tokenizer, list(personal))
            with torch.no_grad():  # the class phrase is the target: a trained encoder must not drift it instead
                f_plain = self.features(encoder, tokenizer, list(plain))
            losses.append((1 - torch.nn.functional.cosine_similarity(f_personal.float(), f_plain.float(), dim=-1)).mean())
        return self.weight * torch.stack(losses).mean()

    def check(self, components) -> None:
        """Fail before anything is written when the pooling cannot apply to this model."""
        if self.pooling == "argmax_id" and len(components.tunable_text_encoders) > 1:  # SDXL, SD3
            raise ConfigError("method.spl.pooling 'argmax_id' reproduces SD-1.5's text-encoder pooling; "
                              f"{components.family.name}'s encoders pool differently: use pooling: eos")

    def features(self, encoder, tokenizer, phrases: list[str]) -> torch.Tensor:
        """(N, hidden) pooled final-layer features of ``phrases`` (each tokenized alone, no padding, as the paper)."""
        device = next(encoder.parameters()).device
        out = []
        for phrase in phrases:
            ids = tokenizer(phrase, return_tensors="pt").input_ids.to(device)
            result = encoder(ids)
            if self.pooling == "argmax_id":
                out.append(result.pooler_output[0])
            else:
                eos = (ids[0] == tokenizer.eos_token_id).nonzero()
                out.append(result.last_hidden_state[0, int(eos[0]) if len(eos) else -1])
        return torch.stack(out)


def _drop_identifier(template: str) -> str:
    return " ".join(template.replace("{V}", " ").split())
