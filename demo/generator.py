"""Generation for the Generate tab: one trained result kept loaded, sampled with or without FreeCure."""

from __future__ import annotations

import threading

from t2i_personal.models.tokenizer import check_pipeline_prompt
from t2i_personal.errors import UserError

from .errors import DemoError


class Generator:
    """Loads a trained result once (``load_personalized``) and generates from it, with or without FreeCure."""

    def __init__(self):
        self._loaded: tuple[str, object] | None = None
        self._cure: tuple[tuple, object] | None = None  # FreeCure may load a foundation model: built once per choice
        self._lock = threading.Lock()

    def pipeline(self, result: str):
        from t2i_personal import load_personalized

        if self._loaded is None or self._loaded[0] != result:
            self._loaded, self._cure = None, None
            self._loaded = (result, load_personalized(result))
        return self._loaded[1]

    def freecure(self, result: str, attributes: str, mask_source: str, omega: float | None = None):
        from t2i_personal.freecure import FreeCure, FreeCureOptions

        options = FreeCureOptions(attributes=attributes, mask_source=mask_source, omega=omega).check()
        if self._cure is None or self._cure[0] != (result, options):
            self._cure = ((result, options), FreeCure(self.pipeline(result), options))
        return self._cure[1]

    def __call__(self, result: str, prompt: str, *, seed: int | None = 0, steps: int = 25, guidance: float = 5.0,
                 lora_scale: float = 1.0, freecure: bool = False, attributes: str = "auto",
                 mask_source: str = "auto", omega: float | None = None) -> dict:
        """``{"personalized", "foundation", "mask", "repaired"}`` images (the last three with FreeCure only).
        ``omega``: FreeCure's FASA weight; ``None`` (a blank field) is the model family's default."""
        if not prompt or not prompt.strip():
            raise DemoError("write a prompt, with the identifier, e.g. 'a photo of sks dog on the beach'")
        try:
            omega = None if omega is None or str(omega).strip() == "" else float(omega)
            with self._lock:
                return self._generate(result, prompt, int(seed or 0), int(steps), float(guidance), float(lora_scale),
                                      freecure, (attributes or "auto").strip(), mask_source or "auto", omega)
        except DemoError:
            raise
        except (UserError, OSError, ValueError, RuntimeError) as exc:
            # what the CLI reports as "error: ...", plus running out of (GPU) memory
            raise DemoError(f"{type(exc).__name__}: {exc}") from exc

    def _generate(self, result, prompt, seed, steps, guidance, lora_scale, freecure, attributes, mask_source,
                  omega) -> dict:
        import torch

        from t2i_personal.families import call_defaults
        from t2i_personal.inference.pipeline import personalization_record

        pipe = self.pipeline(result)
        pipe.set_progress_bar_config(disable=True)
        check_pipeline_prompt(prompt, pipe)
        adapters = pipe.get_active_adapters() if hasattr(pipe, "get_active_adapters") else []
        if adapters:
            pipe.set_adapters(adapters, adapter_weights=[lora_scale] * len(adapters))
        size = (personalization_record(pipe) or {}).get("config", {}).get("data", {}).get("resolution")
        if not freecure:
            image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                         generator=torch.Generator().manual_seed(seed), **call_defaults(pipe)).images[0]
            return {"personalized": image}
        cure = self.freecure(result, attributes, mask_source, omega)
        out = cure(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                   compare=True)
        return {"personalized": out.personalized_images[0],
                "foundation": out.foundation_images[0] if out.foundation_images else None,
                "mask": out.mask[0], "repaired": out.images[0],
                "attributes": ", ".join(f"{a} ({s})" for a, s in out.mask_sources.items()) or "nothing to repair"}
