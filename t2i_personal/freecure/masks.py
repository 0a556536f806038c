"""Attribute masks for FreeCure: where, in the foundation image, the prompt's attributes are.

Three sources, each giving a ``{0, 1}`` mask per image at latent resolution (FASA resizes it to each layer):

* **face parsing** (the paper's source, faces only): a semantic-segmentation model through transformers
  (default ``jonathandinu/face-parsing``, SegFormer with CelebAMask-HQ's 19 labels; the toy world ships one in the
  same format) runs on the decoded foundation image; :data:`FACE_ATTRIBUTES` maps prompt words to label *names*,
  looked up in the model's own ``label2id`` (so a parser with another label order still works). The released
  code resizes its 512² parse to 128² bilinearly and keeps only pixels still fully inside; here the parse is
  area-averaged to the latent grid and a cell is kept when at least half of it is inside, because at the small
  latent grids of SD-1.x layers (and the toy world's 16²) full-coverage erosion deletes glasses frames entirely.
* **cross-attention** (beyond the paper: pets and objects, "sks dog wearing a red hat"): the foundation's
  cross-attention probabilities of the attribute's tokens, averaged over heads, steps and the mid-resolution
  layers (32² at the model's native size: ``up``/``down`` blocks at 1/2 of the latent side for SD-1.x, 1/4 for
  SDXL), upsampled bilinearly to the latent grid, min-max normalised and thresholded with Otsu's method. This is
  the recipe of FreeCure v1's released code (its ``add_semantic_guidance``) without its ``exp(10·x)`` sharpening, which only reshapes the
  histogram that Otsu then splits.
* a **user mask** image (white = attribute), resized to the latent grid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError, ModelLoadError
from ..weights import check_weights_dir, offline_error
from .fasa import family_defaults, layer_grid

DEFAULT_FACE_PARSER = "jonathandinu/face-parsing"
TOY_FACE_PARSER = "builtin:toy-face-parser"

# attribute -> (prompt words that name it, CelebAMask-HQ label names). Matching is by whole word, so
# "eyeglasses" is glasses and never eyes.
FACE_ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hair": (("hair", "haired", "hairstyle", "haircut", "bangs", "ponytail", "braid", "braids", "curls"), ("hair",)),
    "glasses": (("glasses", "eyeglasses", "sunglasses", "spectacles", "goggles"), ("eye_g",)),
    "eyes": (("eye", "eyes"), ("l_eye", "r_eye")),
    "eyebrows": (("eyebrow", "eyebrows", "brow", "brows"), ("l_brow", "r_brow")),
    "hat": (("hat", "cap", "beanie", "beret", "helmet"), ("hat",)),
    "earrings": (("earring", "earrings"), ("ear_r",)),
    "necklace": (("necklace", "pendant", "choker"), ("neck_l",)),
    "mouth": (("mouth", "lip", "lips", "lipstick"), ("mouth", "u_lip", "l_lip")),
    "nose": (("nose",), ("nose",)),
    "ears": (("ear", "ears"), ("l_ear", "r_ear")),
}
# Things worn or carried that "auto" looks for beyond the face table (cross-attention masks).
ACCESSORY_WORDS = ("scarf", "collar", "bow", "tie", "bowtie", "headphone", "headphones", "crown", "bandana",
                   "backpack", "shirt", "sweater", "jacket", "coat", "shoes", "boots", "sunhat", "wreath", "ribbon")
PERSON_NOUNS = ("person", "man", "woman", "boy", "girl", "child", "kid", "lady", "guy", "face", "people", "baby")
MASK_SOURCES = ("auto", "face_parsing", "cross_attention")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def face_attribute(word: str) -> str | None:
    """The :data:`FACE_ATTRIBUTES` key a word or attribute name belongs to (``"sunglasses"`` -> ``"glasses"``)."""
    word = word.lower().strip()
    if word in FACE_ATTRIBUTES:
        return word
    last = _words(word)[-1:] or [word]  # "red hair" -> "hair"
    return next((k for k, (words, _) in FACE_ATTRIBUTES.items() if last[0] in words), None)


def attribute_list(attributes) -> list[str]:
    """Explicit attributes as a list: ``"hair, glasses"`` or ``["hair", "glasses"]`` -> ``["hair", "glasses"]``."""
    items = attributes.split(",") if isinstance(attributes, str) else attributes
    return [a.strip() for a in items if a.strip()]


def find_attributes(prompt: str) -> list[str]:
    """The attribute words of a prompt, in order: face-table words and accessories (``"auto"`` attributes)."""
    known = {w for words, _ in FACE_ATTRIBUTES.values() for w in words} | set(ACCESSORY_WORDS)
    found: list[str] = []
    for w in _words(prompt):
        if w in known and w not in found:
            found.append(w)
    return found


def is_person(class_noun: str) -> bool:
    return any(w in PERSON_NOUNS for w in _words(class_noun))


# ------------------------------------------------------------------------------------------------- face parsing


@dataclass
class FaceParser:
    model: torch.nn.Module
    processor: object
    source: str

    def label_ids(self, attribute: str) -> list[int]:
        key = face_attribute(attribute)
        if key is None:
            raise ConfigError(f"attribute {attribute!r} is not a face part the face parser knows; face attributes "
                              f"are {', '.join(FACE_ATTRIBUTES)} (or use mask_source='cross_attention')")
        label2id = {k.lower(): int(v) for k, v in self.model.config.label2id.items()}
        ids = [label2id[name] for name in FACE_ATTRIBUTES[key][1] if name in label2id]
        if not ids:
            raise ConfigError(f"the face parser {self.source} has no label for {attribute!r} (wanted "
                              f"{FACE_ATTRIBUTES[key][1]}; it has {sorted(label2id)})")
        return ids

    def parse(self, images: list[Image.Image]) -> np.ndarray:
        from ..toyworld.face_parser import parse

        return parse(self.model, self.processor, images)


def load_face_parser(source: str = DEFAULT_FACE_PARSER, device="cpu", allow_pickle: bool = False) -> FaceParser:
    """A semantic-segmentation model and its processor from a hub id, a local folder, or ``builtin:toy-face-parser``."""
    from ..toyworld.face_parser import DEFAULT_PATH

    model, processor = load_semantic_segmentation(source, what="face parser", builtins={TOY_FACE_PARSER: DEFAULT_PATH},
                                                  device=device, allow_pickle=allow_pickle)
    return FaceParser(model, processor, str(source))


def load_semantic_segmentation(source: str, *, what: str, builtins: dict, device="cpu", allow_pickle: bool = False):
    """(model in float32 eval mode, image processor) of any ``AutoModelForSemanticSegmentation`` from a hub id, a
    local folder, or a name in ``builtins`` (name -> folder); safetensors unless ``allow_pickle``."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    if source in builtins:
        location, local = str(builtins[source]), True
    else:
        location = os.path.expanduser(str(source))
        local = Path(location).exists()
    if local:
        check_weights_dir(Path(location), allow_pickle, "model.safetensors")
    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(
            location, use_safetensors=None if allow_pickle else True, local_files_only=local)
        processor = AutoImageProcessor.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"could not load the {what} folder {location}: {exc}") from exc
        raise offline_error(what, location, exc) from exc
    return model.to(device=device, dtype=torch.float32).eval(), processor


def face_parsing_mask(parser: FaceParser, images_or_labels, attribute: str,
                      latent_shape: tuple[int, int]) -> torch.Tensor:
    """``[B, 1, h, w]`` in {0, 1}: where the parser finds ``attribute``'s labels, on the latent grid. Takes the
    images or their label maps (``parser.parse(images)``, to parse once for several attributes)."""
    labels = images_or_labels if isinstance(images_or_labels, np.ndarray) else parser.parse(images_or_labels)
    labels = torch.from_numpy(labels)  # [B, H, W]
    inside = torch.isin(labels, torch.tensor(parser.label_ids(attribute))).float()[:, None]
    return (F.adaptive_avg_pool2d(inside, latent_shape) >= 0.5).float()


# ---------------------------------------------------------------------------------------------- cross-attention


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance of the histogram."""
    hist = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    weight_low = hist.cumsum(0)
    weight_high = hist.sum() - weight_low
    mass_low = (hist * centres).cumsum(0)
    mean_low = mass_low / weight_low.clamp(min=1e-12)
    mean_high = (mass_low[-1] - mass_low) / weight_high.clamp(min=1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float((between.argmax() + 1) / bins)


def token_positions(tokenizer, prompt: str, phrase: str) -> list[int]:
    """Positions of ``phrase``'s tokens inside the tokenized ``prompt`` (BOS at 0), or ``[]`` if absent."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    sub = tokenizer(phrase, add_special_tokens=False).input_ids
    for start in range(1, len(ids) - len(sub) + 1):
        if ids[start:start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    return []


class CrossAttentionRecorder:
    """A cross-attention (``attn2``) processor that also sums the conditional rows' attention probabilities,
    averaged over heads, into ``maps[name]`` (``[B, N, tokens]``) on every call.

    Over diffusers' standard processor it computes the attention itself from one set of projections (the text has
    only 77 keys, so explicit probabilities are cheap); any other processor (IP-Adapter, ...) is called as is and
    the probabilities are computed beside it.
    """

    def __init__(self, name: str, inner, maps: dict, batch: int):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.name, self.inner, self.maps, self.batch = name, inner, maps, batch
        self.standard = type(inner) in (AttnProcessor, AttnProcessor2_0)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        standard = (self.standard and attention_mask is None and attn.spatial_norm is None
                    and hidden_states.ndim == 3 and not attn.residual_connection)
        rows = hidden_states.shape[0]
        x = hidden_states if standard else hidden_states[rows - self.batch:]
        context = encoder_hidden_states if standard else encoder_hidden_states[rows - self.batch:]
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        b, n, _ = x.shape
        q = attn.to_q(x).view(b, n, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(context).view(b, context.shape[1], attn.heads, -1).transpose(1, 2)
        # logits and softmax in float32 whatever the model's dtype (SD-2.x's upcast_attention, fp16 overflow)
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)  # [b, heads, N, tokens]
        self.maps[self.name] = self.maps.get(self.name, 0) + probs[b - self.batch:].mean(1).detach()
        if not standard:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        v = attn.to_v(context).view(b, context.shape[1], attn.heads, -1).transpose(1, 2)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _attention_factors(unet) -> dict[str, int]:
    """Downsampling factor (relative to the latent) of every ``attn2`` module, from the UNet's block layout."""
    n = len(unet.config.block_out_channels)
    factors = {}
    for name, _ in unet.named_modules():
        if not name.endswith(".attn2"):
            continue
        part, index = name.split(".")[:2]
        if part == "down_blocks":
            factors[name] = 2 ** int(index)
        elif part == "up_blocks":
            factors[name] = 2 ** (n - 1 - int(index))
        else:  # mid_block
            factors[name] = 2 ** (n - 1)
    return factors


def map_layers(unet) -> list[str]:
    """The cross-attention layers whose maps are averaged: 32² at the native size (the family's ``map_factor``:
    1/2 of the latent side for SD-1.x, 1/4 for SDXL), or the nearest resolution the UNet has."""
    factors = _attention_factors(unet)
    if not factors:
        raise ConfigError("this UNet has no cross-attention layers: cross-attention masks are impossible")
    target = family_defaults(unet).map_factor
    best = min(abs(np.log2(f / target)) for f in factors.values())
    return [name for name, f in factors.items() if abs(np.log2(f / target)) == best]


def cross_attention_mask(maps: dict, positions: list[list[int]], latent_shape: tuple[int, int]) -> torch.Tensor:
    """``[B, 1, h, w]`` in {0, 1}: Otsu-thresholded, layer-averaged attention to each image's token ``positions``."""
    per_layer = []
    for probs in maps.values():
        b, n, _ = probs.shape
        h, w = layer_grid(n, latent_shape)
        columns = torch.stack([probs[i, :, positions[i]].sum(-1) for i in range(b)])  # [B, N]
        grid = columns.view(b, 1, h, w)
        per_layer.append(F.interpolate(grid, size=latent_shape, mode="bilinear", align_corners=False))
    heat = torch.stack(per_layer).mean(0)
    out = torch.zeros_like(heat)
    for i in range(heat.shape[0]):
        lo, hi = heat[i].min(), heat[i].max()
        norm = (heat[i] - lo) / (hi - lo).clamp(min=1e-12)
        out[i] = (norm > otsu_threshold(norm)).float()
    return out


# ----------------------------------------------------------------------------------------------------- user mask


def user_mask(image, batch: int, latent_shape: tuple[int, int]) -> torch.Tensor:
    """A user's mask (path, PIL image, array or tensor; white/nonzero = attribute) on the latent grid."""
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu().numpy()
    else:
        if isinstance(image, (str, os.PathLike)):
            from ..data.images import load_image_rgb

            image = load_image_rgb(image)  # the same checks as training images (corrupt, bombs, modes, EXIF)
        array = np.asarray(image.convert("L")) if isinstance(image, Image.Image) else np.asarray(image, dtype=float)
    array = np.asarray(array, dtype=np.float32).squeeze()
    if array.ndim != 2:
        raise ConfigError(f"a FreeCure mask must be one 2-D image (white = attribute), got shape {array.shape}")
    if array.max() > 1:
        array = array / 255.0
    mask = torch.from_numpy(array)[None, None]
    mask = (F.adaptive_avg_pool2d(mask, latent_shape) >= 0.5).float()
    if not mask.any():
        raise ConfigError("the FreeCure mask image is empty (no white pixels): nothing would be repaired")
    return mask.expand(batch, -1, -1, -1).clone()


def mask_image(mask: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A ``[1, h, w]`` latent-grid mask as an ``L`` image of ``size`` (W, H), nearest, for display."""
    array = (mask[0].cpu().numpy() * 255).astype(np.uint8)
    return Image.fromarray(array, mode="L").resize(size, Image.NEAREST)
