"""FreeCure attribute repair: ``FreeCure(pipe)(prompt, seed=0)``; see :mod:`.pipeline`, settings in :mod:`.options`."""

from .options import FreeCureOptions
from .pipeline import FreeCure, FreeCureOutput, to_foundation_prompt

__all__ = ["FreeCure", "FreeCureOptions", "FreeCureOutput", "to_foundation_prompt"]
