"""What a model family is: everything that differs between model generations, behind one interface.

The trainer, the methods, FreeCure and the evaluator hold a :class:`ModelFamily` (``components.family``) and ask
it; they never compare family names. A family says

* how its models load and save: its diffusers pipeline class, how it recognises a pipeline, a single file or a
  denoiser as its own, its ``builtin:`` tiny models, and the original single-file layout of a full fine-tune;
* how text conditions the denoiser: :meth:`encode` turns token ids into one :class:`Conditioning`, and
  :meth:`add_image_conditioning` adds what depends on the image (SDXL's size and crop ids);
* how it trains: :meth:`objective` (timesteps, noisy input, target, per-sample weights) and :meth:`denoise`;
* its adapter defaults: LoRA targets, the kohya/A1111 names of its LoRA keys, which attention modules read the
  image ("self") and which read the text ("cross").

A new family is one module next to ``sd.py``, ``sdxl.py``, ``sd3.py`` and ``flux.py``, registered in
``families/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError


def tokenizer_name(text_encoder_name: str) -> str:
    return text_encoder_name.replace("text_encoder", "tokenizer")

@dataclass(frozen=True)
class FreeCureDefaults:
    """FreeCure's released settings for a family (``t2i_personal/freecure``)."""

    omega: float  # FASA's ω: 0.5 on SD-1.4 (Face2Diffusion), 1.5 on SDXL (PhotoMaker, InstantID); 1.0 on MM-DiTs
    #: FASA layers: the last N decoder self-attentions (SDXL's released layer_idx 50-69: the last 20 of 70
    #: transformer blocks, all decoder); None: every self-attention of the last two decoder blocks with attention
    #: (UNet families only)
    fasa_decoder_blocks: int | None = None
    #: cross-attention maps are averaged over the layers at 1/map_factor of the latent side (32² at native size)
    #: (UNet families only)
    map_factor: int = 2
    #: where FASA acts: "self" (a UNet's self-attention, ``freecure/fasa.py``) or "joint" (an MM-DiT's joint
    #: text-image attention, ``freecure/joint_fasa.py``: layers from ``default_joint_layers``, attribute maps from
    #: ``default_map_layers``; ``fasa_decoder_blocks`` and ``map_factor`` do not apply)
    attention: str = "self"
    #: FASA acts from this fraction of the sampling steps on (0: every step, as the released code). A
    #: flow-matching transformer fixes the layout in its first steps, and a repair there can redraw the whole
    #: picture (FLUX toy world, README); later steps still change the attribute
    fasa_start: float = 0.0


@dataclass
class NoisedBatch:
    """What a training objective makes of clean latents: the denoiser's input, the target and per-sample weights."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    loss_weights: torch.Tensor  # [B]
    sigmas: torch.Tensor | None = None  # flow matching: the noise level of each sample, [B, 1, ..., 1]


@dataclass
class Conditioning:
    """Everything the denoiser reads besides the noisy latents and the timestep, one row per sample."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # a pooled text vector (SDXL, SD3, FLUX)
    time_ids: torch.Tensor | None = None  # image size/crop micro-conditioning (SDXL)
    guidance: torch.Tensor | None = None  # the embedded guidance scale per sample (FLUX.1-dev)

    def select(self, rows: torch.Tensor) -> "Conditioning":
        """The rows picked by a boolean mask or an index tensor."""
        pick = lambda x: None if x is None else x[rows.to(x.device)]  # noqa: E731
        return Conditioning(pick(self.encoder_hidden_states), pick(self.pooled), pick(self.time_ids),
                            pick(self.guidance))

    def replace(self, **changes) -> "Conditioning":
        return replace(self, **changes)


class ModelFamily:
    """Base class of the families; subclasses set the class attributes and override what differs."""

    name: str = ""
    pipeline_class: type = None  # type: ignore[assignment]
    pipeline_kwargs: dict = {}  # extra arguments for from_pretrained / from_single_file / the constructor
    denoiser_name: str = "unet"  # the pipeline's attribute: unet or transformer
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    # text encoders that text-encoder training, learned tokens and SPL act on (the CLIPs; T5 stays frozen)
    tunable_text_encoders: tuple[str, ...] = ("text_encoder",)
    default_guidance_scale = 7.5  # validation images' guidance when validation.guidance_scale is not set
    # learned-token files with several encoders: each encoder's key (diffusers' SDXL / advanced FLUX scripts)
    token_file_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    lora_target_modules = {"denoiser": ["to_q", "to_k", "to_v", "to_out.0"],
                           "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    freecure: FreeCureDefaults | None = None  # None: FreeCure has no released settings for this family
    # fp16 is not enough for this family's VAE (it overflows): mixed precision keeps it in float32
    vae_needs_float32_in_fp16 = False

    def __repr__(self) -> str:
        return f"<model family {self.name!r}>"

    # ------------------------------------------------------------------ recognising models

    def claims_pipeline(self, class_name: str) -> bool:
        """Whether a diffusers ``model_index.json`` ``_class_name`` is this family's."""
        raise NotImplementedError

    def claims_single_file(self, keys: set[str]) -> bool:
        """Whether an original-layout checkpoint with these tensor names is this family's."""
        raise NotImplementedError

    def claims_denoiser(self, denoiser) -> bool:
        """Whether a loaded denoiser (UNet, transformer) is this family's."""
        raise NotImplementedError

    # ------------------------------------------------------------------ components and pipelines

    def components_from_pipeline(self, pipe, source: str):
        from ..models.components import Components

        names = [self.denoiser_name, *self.text_encoder_names, *map(tokenizer_name, self.text_encoder_names)]
        return Components(family=self, vae=pipe.vae, scheduler=pipe.scheduler, source=source,
                          **{n: getattr(pipe, n, None) for n in names})

    def pipeline(self, components, scheduler):
        """A pipeline sharing ``components``' modules (no copies) with ``scheduler``."""
        names = [self.denoiser_name, *self.text_encoder_names, *map(tokenizer_name, self.text_encoder_names)]
        return self.pipeline_class(vae=components.vae, scheduler=scheduler,
                                   **{n: getattr(components, n) for n in names}, **self.pipeline_kwargs)

    def pipeline_call_kwargs(self, components) -> dict:
        """Extra arguments every generation passes to this family's pipeline (e.g. T5's sequence length)."""
        return {}

    def build_tiny(self, spec: dict, seed: int, source: str):
        """Seeded random components from a ``models/configs/*.json`` spec."""
        raise NotImplementedError

    def save_single_file(self, components, path, dtype: torch.dtype, metadata: dict) -> None:
        """A full fine-tune as one original-layout ``.safetensors`` (what A1111 / ComfyUI load)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ text conditioning

    def tokenize(self, components, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer; a prompt longer than the encoder's window is an error, not a silent cut."""
        if not prompts:
            return [torch.zeros(0, tok.model_max_length, dtype=torch.long) for tok in components.tokenizers]
        from ..models.tokenizer import check_prompt_length

        for prompt in prompts:
            check_prompt_length(prompt, components.tokenizers)
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in components.tokenizers]

    def call_defaults(self, pipe) -> dict:
        """Call arguments a loaded pipeline of this family needs beyond diffusers' defaults (e.g. the T5 window a
        result was trained with); every generation in the toolkit passes them unless told otherwise."""
        return {}

    def prompt_windows(self, pipe) -> list[tuple[object, int]]:
        """(tokenizer, most tokens it reads) for each window of a loaded pipeline a prompt must fit in."""
        names = [tokenizer_name(n) for n in self.text_encoder_names]
        return [(t, t.model_max_length) for t in (getattr(pipe, n, None) for n in names) if t is not None]

    def encode(self, components, input_ids: list[torch.Tensor], text_encoders: list | None = None) -> Conditioning:
        """The text part of the conditioning, exactly as this family's diffusers pipeline computes it."""
        raise NotImplementedError

    def add_image_conditioning(self, cond: Conditioning, original_sizes, crops_top_left, target_size) -> Conditioning:
        """Add what depends on the training image (none by default)."""
        return cond

    # ------------------------------------------------------------------ training

    def scale_latents(self, vae, sample: torch.Tensor) -> torch.Tensor:
        """A VAE posterior sample in the scale the denoiser works in (float32): ``(z - shift) * scale``, the
        shift being 0 for the SD VAEs and the config's ``shift_factor`` for SD3's and FLUX's."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (sample.float() - shift) * vae.config.scaling_factor

    def unpack_latents(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``output_type="latent"`` latents of this family's pipeline as [B, C, h, w] (FLUX returns them packed)."""
        return latents

    def pixel_multiple(self, components) -> int:
        """Image sides must be a multiple of this (the VAE's downsampling, times any latent patching)."""
        return components.vae_scale_factor

    def check_resolution(self, components, resolution: int) -> None:
        multiple = self.pixel_multiple(components)
        if resolution % multiple:
            nearest = max(multiple, round(resolution / multiple) * multiple)
            raise ConfigError(f"data.resolution {resolution} does not fit this {self.name} model: image sides must be a "
                              f"multiple of {multiple} (its VAE's downsampling times its latent patch); try {nearest}")

    def check_training(self, training) -> None:
        """Refuse training options that do not apply to this family (before anything is written)."""
        if training.max_sequence_length is not None or training.guidance_scale is not None or \
                training.learn_tokens_in_t5 or training.flow_matching != type(training.flow_matching)():
            raise ConfigError(f"training.max_sequence_length, guidance_scale, learn_tokens_in_t5 and flow_matching "
                              f"apply to the flow-matching families (sd3, flux); this is an {self.name} model: "
                              "remove them")

    def training_guidance(self, denoiser, training) -> float | None:
        """The guidance value a guidance-distilled denoiser is trained with (None: it has no guidance input)."""
        return None

    def objective(self, components, training) -> "object":
        """The training objective (see ``families/ddpm.py``) for ``training`` (a TrainingConfig)."""
        raise NotImplementedError

    def denoise(self, denoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's output for [B, C, h, w] latents, as [B, C, h, w] (a family that packs latents into
        tokens packs and unpacks here)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters and attention

    def lora_state_for_saving(self, peft_state: dict) -> dict:
        """A module's peft LoRA state as this family's diffusers loader reads it (the transformer families'
        loaders read peft's own keys, as diffusers' FLUX/SD3 scripts save them)."""
        return peft_state

    def kohya_lora_state(self, peft_state: dict, alpha: float) -> dict | None:
        """A LoRA (peft keys prefixed by component name) in the kohya / A1111 / ComfyUI layout of this family;
        None where those tools read the diffusers file itself."""
        return None

    def cross_attention_modules(self, denoiser) -> dict[str, torch.nn.Module]:
        """Attention modules whose keys and values come from the text (Custom Diffusion, cross-attention maps)."""
        raise ConfigError(f"{self.name} models have no separate cross-attention")

    def text_kv_projections(self, denoiser) -> dict[str, torch.nn.Module]:
        """Joint attention: the projections that turn text tokens into keys and values, by module name ({} where
        text enters through cross-attention instead)."""
        return {}

    def self_attention_names(self, denoiser) -> list[str]:
        """Attention modules over the image tokens, in forward order."""
        raise NotImplementedError
