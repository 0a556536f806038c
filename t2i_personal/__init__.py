"""t2i-personal: personalized text-to-image generation (DreamBooth full/LoRA with prior preservation, ...)."""

__version__ = "0.1.0"


def load_personalized(output_dir, device=None, dtype=None):
    """Return a ready diffusers pipeline for a trained result (an output folder or a checkpoint's ``inference/``)."""
    from .inference.pipeline import load_personalized as _load

    return _load(output_dir, device=device, dtype=dtype)


__all__ = ["__version__", "load_personalized"]
