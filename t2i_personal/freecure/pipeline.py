"""FreeCure (Cai et al., "Foundation Cures Personalization", v2): repair the attributes a personalized model drops.

One call:

1. **foundation pass** — the un-personalized model (:mod:`.foundation`: LoRA disabled, Custom Diffusion
   processors set aside, or the base model of a full fine-tune) generates the prompt with each identifier removed
   and its class noun kept, from the same seed (same initial latent, same per-step noise), recording the
   conditional K/V of the FASA layers (:mod:`.fasa`) and, when a mask needs them, the attribute tokens'
   cross-attention maps;
2. **masks** of the prompt's attributes on the foundation image (:mod:`.masks`);
3. **personalized pass** with FASA on the chosen self-attention layers: inside the masks the personalized
   queries also read the foundation's keys/values (+ω), elsewhere nothing changes;
4. **APG** (:mod:`.apg`) when the prompt has expression words.

About 2× a plain generation (one foundation and one personalized pass) where the released code runs two dual
passes (≈4×); ``benchmarks/freecure_cost.py`` measures it.

MM-DiT pipelines (FLUX.1, SD3/3.5; their family's ``FreeCureDefaults.attention == "joint"``) run the same steps with
:mod:`.joint_fasa`: FASA on the image queries of the joint text-image attention (``layers``: its module names or
patterns, default :func:`.joint_fasa.default_joint_layers`), and ``mask_source="cross_attention"`` reads the joint
attention's image→text maps (:class:`.joint_fasa.JointAttentionMaps`) at the attribute's tokens (FLUX: T5's
positions; SD3: the first CLIP's). Masks are thresholded at token resolution. APG (DDIM inversion of an
ε-prediction UNet) is not available there and is refused when it would run.
"""

from __future__ import annotations

import inspect
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from ..errors import ConfigError, ModelLoadError
from ..inference.sampling import decode_latents
from . import apg as apg_module
from .fasa import FasaState, FoundationAwareSelfAttention, family_defaults, resolve_layers
from .foundation import build_foundation, denoiser_of
from ..models.loading import PRETRAINED_BUILTINS
from .masks import (DEFAULT_FACE_PARSER, FACE_ATTRIBUTES, TOY_FACE_PARSER, CrossAttentionRecorder, FaceParser,
                    attribute_list, cross_attention_mask, face_attribute, face_parsing_mask, find_attributes,
                    is_person, load_face_parser, map_layers, mask_image, token_positions, user_mask)
from .joint_fasa import (JointAttentionMaps, JointFasaState, installed, joint_fasa_processors, model_kind,
                         resolve_joint_layers, text_token_positions, token_grid, token_patch)
from .options import FreeCureOptions


@dataclass
class FreeCureOutput:
    """What one call returns; lists hold one entry per image.

    ``images``: the repaired images (after APG when it ran); ``foundation_images``: what the foundation drew
    from the same seed (empty when no attribute was planned: then only the plain generation runs); ``masks``:
    per image, ``{attribute: L image}`` at image size; ``mask``: their union per image; ``mask_sources``:
    ``{attribute: "face_parsing" | "cross_attention" | "user"}``; ``before_apg``: the FASA result when APG ran;
    ``personalized_images``: the plain personalized generation (``compare=True`` only).
    """

    images: list[Image.Image]
    foundation_images: list[Image.Image]
    masks: list[dict[str, Image.Image]]
    mask: list[Image.Image]
    attributes: list[str]
    mask_sources: dict[str, str]
    prompts: list[str]
    foundation_prompts: list[str]
    apg_applied: bool = False
    before_apg: list[Image.Image] | None = None
    personalized_images: list[Image.Image] | None = None
    settings: dict = field(default_factory=dict)

    def panel(self, index: int = 0) -> Image.Image:
        """A labelled strip: foundation | attribute mask over it | (personalized) | repaired."""
        from PIL import ImageDraw

        tiles = []
        if self.foundation_images:  # absent when the prompt named nothing to repair
            foundation = self.foundation_images[index]
            overlay = foundation.convert("RGB").copy()
            tint = Image.new("RGB", overlay.size, (255, 0, 80))
            overlay = Image.composite(Image.blend(overlay, tint, 0.55), overlay, self.mask[index])
            tiles = [("foundation", foundation), ("mask: " + ", ".join(self.attributes), overlay)]
        if self.personalized_images is not None:
            tiles.append(("personalized", self.personalized_images[index]))
        if self.before_apg is not None:
            tiles.append(("FASA", self.before_apg[index]))
        omega = self.settings.get("omega")
        label = "FreeCure" + (f" w={omega:g}" if omega is not None else "") + (" + APG" if self.apg_applied else "")
        tiles.append((label, self.images[index]))
        w, h = self.images[index].size
        scale = max(1, 192 // max(w, h))
        label_h = 14
        canvas = Image.new("RGB", (len(tiles) * w * scale, h * scale + label_h), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (label, image) in enumerate(tiles):
            canvas.paste(image.convert("RGB").resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, label_h))
            draw.text((i * w * scale + 3, 1), label, fill="black")
        return canvas


def _joint_defaults(transformer):
    """``(model kind, FreeCureDefaults)`` of an MM-DiT, or a ConfigError saying what is supported."""
    from ..families import family_of_denoiser

    try:
        kind = model_kind(transformer)
    except TypeError as exc:
        raise ConfigError(f"FreeCure: {exc}") from None
    defaults = family_of_denoiser(transformer).freecure
    if defaults is None or defaults.attention != "joint":
        raise ConfigError(f"FreeCure has no joint-attention settings for {type(transformer).__name__} models")
    return kind, defaults


def to_foundation_prompt(prompt: str, concepts) -> str:
    """The prompt with each identifier removed and its class noun kept: "a sks dog in a hat" -> "a dog in a hat"."""
    for identifier, class_noun in concepts:
        ident = re.escape(identifier)
        prompt = re.sub(rf"(?<!\w){ident}\s+{re.escape(class_noun)}(?!\w)", class_noun, prompt)
        prompt = re.sub(rf"(?<!\w){ident}(?!\w)", class_noun, prompt)
    return re.sub(r"\s{2,}", " ", prompt).strip()


def check_prompts(prompts: list[str], concepts) -> None:
    """Before anything is sampled: refuse an empty prompt, warn about one that names none of the identifiers."""
    if not prompts:
        raise ConfigError("FreeCure was given an empty list of prompts; pass at least one")
    identifiers = [identifier for identifier, _ in concepts if identifier]
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"FreeCure needs a prompt naming the subject (e.g. 'a sks dog wearing a red hat'), "
                              f"not {prompt!r}")
        if identifiers and not any(re.search(rf"(?<!\w){re.escape(i)}(?!\w)", prompt) for i in identifiers):
            warnings.warn(f"FreeCure: the prompt {prompt!r} names none of the identifiers ({', '.join(identifiers)}): "
                          "the image will not show the personal subject, and the foundation pass draws the same "
                          "text, so there is little to repair. Add the identifier unless this is on purpose.",
                          stacklevel=3)


class FreeCure:
    """``FreeCure(pipe)(prompt, seed=0)``: the personalized generation with its dropped attributes repaired.

    ``options``: a :class:`~t2i_personal.freecure.options.FreeCureOptions` (what to repair, mask source, FASA's
    weight and layers, APG, foundation, ...); keyword arguments set single options on top of it, e.g.
    ``FreeCure(pipe, omega=1.0, attributes=["hat"])``. ``concepts`` default to the result's record when ``pipe``
    came from ``load_personalized``.
    """

    def __init__(self, pipe, options: FreeCureOptions | None = None, **overrides):
        options = replace(options or FreeCureOptions(), **overrides).check()
        self.options = options
        self.pipe = pipe
        self.joint = getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None
        if self.joint:  # MM-DiT (FLUX, SD3): joint_fasa
            self.kind, defaults = _joint_defaults(pipe.transformer)
            self.layers = resolve_joint_layers(pipe.transformer, options.layers)
        else:
            defaults = family_defaults(pipe.unet)
            self.layers = resolve_layers(pipe.unet, options.layers)
        self.omega = defaults.omega if options.omega is None else float(options.omega)
        self.fasa_start = defaults.fasa_start if options.fasa_start is None else float(options.fasa_start)
        self.attributes = options.attributes
        self.mask_source = options.mask_source
        self.apg, self.apg_gamma = options.apg, options.apg_gamma
        self.expression_words = tuple(options.expression_words)
        self.allow_pickle = options.allow_pickle
        self.cache_device = options.cache_device
        from ..inference.pipeline import personalization_record  # diffusers: loaded when a FreeCure is made

        record = personalization_record(pipe) or {}
        # the default size: what the result trained at (a FLUX pipeline's own default is 1024 px whatever the model)
        self.resolution = ((record.get("config") or {}).get("data") or {}).get("resolution")
        concepts = options.concepts
        if concepts is None:
            concepts = [(c["identifier"], c["class_noun"]) for c in record.get("concepts", [])]
        self.concepts = [tuple(c) for c in concepts]
        face_parser = options.face_parser
        if face_parser == "auto":
            base = record.get("base_model", {}).get("pretrained", "")
            toy = base in ("builtin:" + name for name in PRETRAINED_BUILTINS)  # the toy world's generators
            face_parser = TOY_FACE_PARSER if toy else DEFAULT_FACE_PARSER
        self._face_parser = face_parser
        self.foundation = build_foundation(pipe, options.foundation, options.allow_pickle)

    # --------------------------------------------------------------------------------------------------- masks

    def face_parser(self) -> FaceParser:
        if not isinstance(self._face_parser, FaceParser):
            self._face_parser = load_face_parser(self._face_parser, denoiser_of(self.pipe).device, self.allow_pickle)
        return self._face_parser

    def _plan_attributes(self, prompts: list[str], attributes) -> tuple[dict, dict, dict]:
        """For this call, checked before anything is sampled: ``{attribute: mask source}``, ``{attribute: [per
        image: repaired?]}`` (an image whose prompt does not name an "auto" attribute gets an empty mask) and, for
        cross-attention masks, ``{attribute: [per image: token positions]}``."""
        every = [True] * len(prompts)
        if not isinstance(self.mask_source, str):  # a mask image: a file, PIL image, array or tensor
            return {"mask": "user"}, {"mask": every}, {}
        named = [find_attributes(p) for p in prompts]
        if attributes == "auto":
            chosen = list(dict.fromkeys(a for found in named for a in found))
            if self.mask_source == "face_parsing":  # what the face parser can find
                dropped = [a for a in chosen if not face_attribute(a)]
                if dropped:
                    warnings.warn(f"FreeCure: {', '.join(dropped)} are not face parts; mask_source='face_parsing' "
                                  "leaves them unrepaired (mask_source='auto' uses cross-attention for them)",
                                  stacklevel=3)
                chosen = [a for a in chosen if face_attribute(a)]
            applies = {a: [a in found for found in named] for a in chosen}
        else:
            chosen = attribute_list(attributes)
            applies = {a: every for a in chosen}
        person = any(is_person(c) for _, c in self.concepts) or any(is_person(p) for p in prompts)
        plan = {}
        for a in chosen:
            if self.mask_source == "auto":
                plan[a] = "face_parsing" if person and face_attribute(a) else "cross_attention"
            else:
                plan[a] = self.mask_source
            if plan[a] == "face_parsing" and not face_attribute(a):
                raise ConfigError(f"attribute {a!r} is not a face part the face parser knows (face attributes: "
                                  f"{', '.join(FACE_ATTRIBUTES)}); use mask_source='cross_attention' or 'auto' for it")
        if "face_parsing" in plan.values() and self.mask_source == "auto":
            try:
                self.face_parser()
            except ModelLoadError as exc:  # e.g. offline without a local copy: say so, use the other source
                warnings.warn(f"FreeCure: no face parser ({exc}); using cross-attention masks instead", stacklevel=3)
                plan = {a: "cross_attention" for a in plan}
        positions = {}
        for a, source in plan.items():
            if source == "cross_attention":
                positions[a] = [self._token_positions(p, a) if use else [] for p, use in zip(prompts, applies[a])]
                if not any(positions[a]):
                    raise ConfigError(f"FreeCure attribute {a!r} does not occur in the prompt {prompts[0]!r}: a "
                                      "cross-attention mask needs the attribute's words in the prompt")
        return plan, applies, positions

    def _masks(self, plan, applies, positions, maps, foundation_images, batch, latent_shape):
        per_attribute, labels = {}, None
        for attribute, source in plan.items():
            if source == "user":
                mask = user_mask(self.mask_source, batch, latent_shape)
            elif source == "face_parsing":
                if labels is None:  # one parse of the foundation images serves every attribute
                    labels = self.face_parser().parse(foundation_images)
                mask = face_parsing_mask(self.face_parser(), labels, attribute, latent_shape)
            elif self.joint:  # joint attention maps: thresholded per token, each token covering patch² latent cells
                tokens = maps.mask(positions[attribute], self._grid(latent_shape))
                patch = latent_shape[0] // tokens.shape[-2]
                mask = tokens.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)
            else:
                mask = cross_attention_mask(maps, positions[attribute], latent_shape)
            where = torch.tensor(applies[attribute], dtype=mask.dtype).view(-1, 1, 1, 1)
            per_attribute[attribute] = mask * where
        return per_attribute

    def _token_positions(self, prompt: str, phrase: str) -> list[int]:
        """Where ``phrase``'s tokens are in the text the attention maps are read at: the UNet's CLIP tokens; FLUX's
        T5 sequence (``tokenizer_2``); SD3's first CLIP (its 77 CLIP rows come first in the joint sequence)."""
        if not self.joint:
            return token_positions(self.pipe.tokenizer, prompt, phrase)
        tokenizer = self.pipe.tokenizer_2 if self.kind == "flux" else self.pipe.tokenizer
        return text_token_positions(tokenizer, prompt, phrase)

    def _grid(self, latent_shape) -> tuple[int, int]:
        """The image-token grid of a latent-resolution shape (joint models)."""
        patch = token_patch(self.pipe.transformer)
        return latent_shape[0] // patch, latent_shape[1] // patch

    # --------------------------------------------------------------------------------------------------- passes

    @staticmethod
    @contextmanager
    def _processors(unet, replace: dict, state: FasaState | None):
        """Temporarily swap some processors (others stay the same objects) and count UNet calls as steps."""
        original = dict(unet.attn_processors)
        unet.set_attn_processor({k: replace.get(k, p) for k, p in original.items()})
        hook = unet.register_forward_pre_hook(state.next_step) if state is not None else None
        try:
            yield
        finally:
            if hook is not None:
                hook.remove()
            unet.set_attn_processor(original)

    def _foundation_pass(self, state: FasaState, maps: dict, plan: dict, run, prompts: list[str]) -> list:
        """The foundation's images; its conditional K/V of the FASA layers go to ``state.cache`` and, for
        cross-attention masks, its attention maps to ``maps``."""
        with self.foundation.active() as base:
            replace = {f"{n}.processor": FoundationAwareSelfAttention(n, state) for n in self.layers}
            if "cross_attention" in plan.values():
                current = base.unet.attn_processors
                for n in map_layers(base.unet):
                    replace[f"{n}.processor"] = CrossAttentionRecorder(n, current[f"{n}.processor"], maps,
                                                                       state.batch)
            state.start("record")
            with self._processors(base.unet, replace, state):
                latents = run(base, prompts)
            return decode_latents(base, latents)

    def _repair_pass(self, state: FasaState, run, prompts: list[str]) -> torch.Tensor:
        """The personalized generation's latents with FASA reading the cached foundation keys/values."""
        state.start("repair")
        replace = {f"{n}.processor": FoundationAwareSelfAttention(n, state) for n in self.layers}
        try:
            with self._processors(self.pipe.unet, replace, state):
                return run(self.pipe, prompts)
        finally:
            state.cache.clear()

    def _joint_foundation_pass(self, state: JointFasaState, plan: dict, run, prompts: list[str], size):
        """MM-DiT: the foundation's images and, for attention masks, its :class:`JointAttentionMaps`; its
        conditional image K/V of the FASA layers go to ``state.cache``."""
        maps = JointAttentionMaps() if "cross_attention" in plan.values() else None
        with self.foundation.active() as base:
            processors = joint_fasa_processors(base.transformer, state, self.layers, maps=maps)
            state.start("record")
            with installed(base.transformer, processors, state):
                latents = run(base, prompts)
            return self._decode(base, latents, size), maps

    def _joint_repair_pass(self, state: JointFasaState, run, prompts: list[str]) -> torch.Tensor:
        state.start("repair")
        processors = joint_fasa_processors(self.pipe.transformer, state, self.layers)
        try:
            with installed(self.pipe.transformer, processors, state):
                return run(self.pipe, prompts)
        finally:
            state.cache.clear()

    def _decode(self, pipe, latents, size) -> list:
        """Images from ``output_type="latent"`` latents (FLUX's packed tokens unpacked first)."""
        if self.joint:
            from ..families import family_of_pipeline

            latents = family_of_pipeline(pipe).unpack_latents(pipe, latents, *size)
        return decode_latents(pipe, latents)

    def _run(self, pipe, prompts, generators, states, kwargs) -> torch.Tensor:
        for g, s in zip(generators, states):
            g.set_state(s)
        generator = generators[0] if len(generators) == 1 else generators
        from ..families import call_defaults

        return pipe(prompts, generator=generator, output_type="latent", **{**call_defaults(pipe), **kwargs}).images

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], *, seed: int | list[int] | None = None, generator=None,
                 foundation_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 negative_prompt: str | list[str] | None = None, attributes=None, compare: bool = False,
                 **pipe_kwargs) -> FreeCureOutput:
        """Generate ``prompt`` (one or a list) with the attributes repaired.

        ``seed`` (one for the batch, or one per prompt) or ``generator``: both passes start from the same generator
        state. ``foundation_prompt``: default, the prompt with each identifier removed and its class noun kept.
        ``height``/``width``: default, the size the result trained at (its record's ``data.resolution``), else the
        pipeline's own default.
        ``attributes`` overrides the constructor's for this call. ``compare=True`` also renders the plain
        personalized images (one pass more). Other keyword arguments (``num_images_per_prompt``, ``eta``, ...) go
        to the pipeline.
        """
        if "prompt_embeds" in pipe_kwargs:
            raise ConfigError("FreeCure needs the prompt text (it derives the foundation prompt and finds attribute "
                              "words in it): pass prompt=..., not prompt_embeds")
        per_prompt = int(pipe_kwargs.pop("num_images_per_prompt", 1) or 1)
        prompts, foundation_prompts, negatives = self._prompts(prompt, foundation_prompt, negative_prompt, per_prompt)
        batch = len(prompts)
        generators = self._generators(seed, generator, batch)
        states = [g.get_state() for g in generators]
        pipe = self.pipe
        if self.joint:  # masks at latent resolution, whole tokens
            self._check_joint_call(prompts)
            sample = pipe.default_sample_size
        else:
            sample = pipe.unet.config.sample_size
            sample = sample if isinstance(sample, int) else sample[0]
        height = height or self.resolution or sample * pipe.vae_scale_factor  # trained size, else the pipeline's
        width = width or self.resolution or sample * pipe.vae_scale_factor
        latent_shape = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        if self.joint:
            grid = token_grid(pipe.transformer, height, width, pipe.vae_scale_factor)
            patch = token_patch(pipe.transformer)
            latent_shape = (grid[0] * patch, grid[1] * patch)
        if guidance_scale is None:  # the pipeline's own default (7.5 for SD-1.x/2.x, 5.0 for SDXL)
            guidance_scale = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
        kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                      width=width, negative_prompt=negatives, **pipe_kwargs)
        plan, applies, positions = self._plan_attributes(foundation_prompts,
                                                         self.attributes if attributes is None else attributes)

        first_step = int(self.fasa_start * num_inference_steps)
        if self.joint:
            state = JointFasaState.for_transformer(pipe.transformer, batch, omega=self.omega,
                                                   cache_device=self.cache_device, first_step=first_step)
        else:
            state = FasaState(omega=self.omega, batch=batch, cache_device=self.cache_device, first_step=first_step)

        def run(target, texts):  # every pass starts from the same generator state: the same initial latent
            return self._run(target, texts, generators, states, kwargs)

        foundation_images: list = []
        per_attribute: dict = {}
        size = (height, width)
        if plan:  # else nothing to repair (no attribute named): only the plain generation runs
            if self.joint:
                foundation_images, maps = self._joint_foundation_pass(state, plan, run, foundation_prompts, size)
            else:
                maps = {}
                foundation_images = self._foundation_pass(state, maps, plan, run, foundation_prompts)
            per_attribute = self._masks(plan, applies, positions, maps, foundation_images, batch, latent_shape)
        union = torch.zeros(batch, 1, *latent_shape)
        for m in per_attribute.values():
            union = torch.maximum(union, m.cpu())
        state.masks = union.to(denoiser_of(pipe).device)
        repair = self._joint_repair_pass if self.joint else self._repair_pass
        latents = repair(state, run, prompts) if plan else run(pipe, prompts)
        unrepaired = None if plan else latents
        if self.joint:  # APG was refused before sampling (_check_joint_call)
            before_apg = None
        else:
            latents, before_apg = self._apg(latents, prompts, negatives, num_inference_steps, guidance_scale, height,
                                            width, pipe_kwargs)
        images = self._decode(pipe, latents, size)

        personalized = None
        if compare:
            personalized = self._decode(pipe, unrepaired if unrepaired is not None else run(pipe, prompts), size)
        size = images[0].size
        masks = [{a: mask_image(m[i], size) for a, m in per_attribute.items()} for i in range(batch)]
        sources = {a: "joint_attention" if self.joint and s == "cross_attention" else s for a, s in plan.items()}
        return FreeCureOutput(
            images=images, foundation_images=foundation_images, masks=masks,
            mask=[mask_image(union[i], size) for i in range(batch)], attributes=list(plan),
            mask_sources=sources, prompts=prompts, foundation_prompts=foundation_prompts,
            apg_applied=before_apg is not None, before_apg=before_apg, personalized_images=personalized,
            settings={"omega": self.omega, "layers": list(self.layers), "fasa_start": self.fasa_start,
                      "first_step": first_step, "apg_gamma": self.apg_gamma,
                      "steps": num_inference_steps, "guidance_scale": guidance_scale, "height": height,
                      "width": width})

    def _check_joint_call(self, prompts: list[str]) -> None:
        """Before sampling on an MM-DiT: refuse what only the UNet path does (APG)."""
        if self.apg and self.apg_gamma > 0:
            words = sorted({w for p in prompts for w in apg_module.expression_words_in(p, self.expression_words)})
            if words:
                raise ConfigError(
                    f"FreeCure option apg: APG (expression repair for {', '.join(words)!s}) DDIM-inverts an "
                    f"epsilon-prediction UNet and is not available for {self.kind.upper()} (flow-matching "
                    "transformer) pipelines. Pass apg=False (or apg_gamma=0) to repair the attributes with joint "
                    "FASA only, or remove the expression words from the prompt")

    def _prompts(self, prompt, foundation_prompt, negative_prompt, per_prompt: int):
        """The personalized, foundation and negative prompts, one per image."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_prompts(prompts, self.concepts)
        if foundation_prompt is None:
            foundation_prompts = [to_foundation_prompt(p, self.concepts) for p in prompts]
        else:
            foundation_prompts = [foundation_prompt] * len(prompts) if isinstance(foundation_prompt, str) else list(
                foundation_prompt)
        if len(foundation_prompts) != len(prompts):
            raise ConfigError(f"{len(foundation_prompts)} foundation prompts for {len(prompts)} prompts")
        # n images per prompt = the prompt repeated n times: the pipeline draws the same [B·n] noise either way,
        # and every image gets its own mask
        prompts = [p for p in prompts for _ in range(per_prompt)]
        foundation_prompts = [p for p in foundation_prompts for _ in range(per_prompt)]
        negatives = None if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
            else [n for n in negative_prompt for _ in range(per_prompt)])
        return prompts, foundation_prompts, negatives

    def _apg(self, latents, prompts, negatives, steps, guidance, height, width, pipe_kwargs):
        """APG on the repaired latents when a prompt has expression words; returns them and the images before it
        (``None`` when APG did not run)."""
        expressive = self.apg and any(apg_module.expression_words_in(p, self.expression_words) for p in prompts)
        if not expressive or self.apg_gamma <= 0:
            return latents, None
        before_apg = decode_latents(self.pipe, latents)
        neutral = [apg_module.neutral_prompt(p, self.expression_words) for p in prompts]
        latents = apg_module.invert_and_regenerate(
            self.pipe, latents, neutral, prompts, gamma=self.apg_gamma, steps=steps, guidance=guidance,
            height=height, width=width, negative_prompt=negatives, clip_skip=pipe_kwargs.get("clip_skip"),
            cross_attention_kwargs=pipe_kwargs.get("cross_attention_kwargs"))
        return latents, before_apg

    def _generators(self, seed, generator, batch) -> list[torch.Generator]:
        """One generator (a single seed: the pipeline's own per-batch noise) or one per image (a list)."""
        if generator is not None:
            gens = generator if isinstance(generator, list) else [generator]
        else:
            seeds = seed if isinstance(seed, list) else [0 if seed is None else seed]
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        if len(gens) not in (1, batch):
            raise ConfigError(f"{len(gens)} seeds/generators for {batch} prompts")
        return gens
