"""FreeCure's settings as one typed object, shared by the Python API, its command line and the evaluator.

>>> options = FreeCureOptions(attributes="hair,glasses", mask_source="face_parsing").check()   # before any model
>>> FreeCure(pipe, options)("a sks man with curly red hair and glasses", seed=0)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .apg import EXPRESSION_WORDS
from .masks import MASK_SOURCES


@dataclass
class FreeCureOptions:
    """What :class:`~t2i_personal.freecure.FreeCure` takes besides the pipeline.

    ``attributes``: ``"auto"`` (face parts and accessories named in the prompt) or words/phrases (a list, or
    comma-separated). ``mask_source``: ``"auto"`` (face parsing for face parts of a person, cross-attention
    otherwise), ``"face_parsing"``, ``"cross_attention"``, or a mask image (path, PIL, array, tensor; white =
    attribute). ``omega`` / ``layers``: FASA's weight and self-attention layers (``None``: the released values for
    the model family). ``fasa_start``: the fraction of the sampling steps before FASA starts acting (``None``: the
    family's, 0 on SD/SDXL as released, 0.25 on FLUX). ``apg``: run APG when the prompt has ``expression_words``; ``apg_gamma``: how far to invert.
    ``face_parser``: hub id, folder or loaded parser (``"auto"``: the toy world's for results on its generators, else
    ``jonathandinu/face-parsing``). ``foundation``: ``None`` (derived from the pipeline), a pipeline, or a model
    source. ``concepts``: ``[(identifier, class_noun)]`` (``None``: from the result's record). ``cache_device``:
    where the foundation's keys/values wait between the passes (``None``: beside the model; ``"cpu"`` frees the
    accelerator's memory, about 6.8 GB per SDXL image at 1024² and 50 steps). ``allow_pickle``: the face parser
    and a foundation source may be pickle files.
    """

    attributes: str | list[str] = "auto"
    mask_source: Any = "auto"
    omega: float | None = None
    layers: str | list[str] | None = None
    fasa_start: float | None = None
    apg: bool = True
    apg_gamma: float = 0.5
    expression_words: tuple[str, ...] = EXPRESSION_WORDS
    face_parser: Any = "auto"
    foundation: Any = None
    concepts: list | None = None
    cache_device: Any = None
    allow_pickle: bool = False

    def check(self) -> FreeCureOptions:
        """Refuse bad values before any model loads; returns the options with a mask file's path resolved."""
        mask_source = self.mask_source
        if isinstance(mask_source, (str, os.PathLike)) and str(mask_source) not in MASK_SOURCES:
            if not Path(mask_source).expanduser().is_file():
                raise ConfigError(f"mask_source {str(mask_source)!r} is neither one of {', '.join(MASK_SOURCES)} "
                                  "nor an existing mask image file (white = attribute)")
            mask_source = Path(mask_source).expanduser()
        if not 0.0 <= float(self.apg_gamma) <= 1.0:
            raise ConfigError(f"apg_gamma must be in [0, 1] (the fraction of the trajectory to invert), not "
                              f"{self.apg_gamma}")
        omega = self.omega
        if omega is not None and not (math.isfinite(float(omega)) and float(omega) >= 0):
            raise ConfigError(f"omega must be a finite number >= 0, not {omega}: FASA adds it to the logits of the "
                              "foundation's keys inside the mask, so each weighs e^omega times a personalized key; "
                              "below 0 the foundation's attribute counts for less, which weakens the repair and "
                              "never reverses it (0.5 for SD-1.x and 1.5 for SDXL are the released values; "
                              "attributes=[] turns it off)")
        start = self.fasa_start
        if start is not None and not (math.isfinite(float(start)) and 0.0 <= float(start) < 1.0):
            raise ConfigError(f"fasa_start must be in [0, 1) (the fraction of the sampling steps before FASA acts), "
                              f"not {start}: 0 repairs from the first step, 0.25 leaves the first quarter, which "
                              "sets the layout, to the personalized model")
        return replace(self, mask_source=mask_source)

    def given(self) -> dict[str, str]:
        """The options that differ from the defaults, as text: what an evaluation records of its FreeCure runs."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)
                if _differs(getattr(self, f.name), f.default)}


def _differs(value, default) -> bool:
    # a type check first: an array or tensor mask compared with "auto" would compare element-wise
    return type(value) is not type(default) or value != default
