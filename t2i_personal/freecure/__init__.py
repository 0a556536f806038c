"""FreeCure attribute repair: ``FreeCure(pipe)(prompt, seed=0)``; see :mod:`.pipeline`."""

from .pipeline import FreeCure, FreeCureOutput, to_foundation_prompt

__all__ = ["FreeCure", "FreeCureOutput", "to_foundation_prompt"]
