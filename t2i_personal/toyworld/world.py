"""The toy world: a procedural universe of 64×64 images with exact labels, part masks and captions.

Every image is a pure function of a :class:`Scene` (what is in it) and the pose numbers inside it, so a seed
reproduces it bit for bit. This module says what can be in a scene, samples scenes and captions them;
:mod:`.drawing` paints them (and owns the pixel-level vocabulary: colours, scenes, parts, styles, the image size).

Pretraining never sees three things: the held-out (class, colour, scene) combinations used by the quality gates,
the personal subjects (``SUBJECTS``) and the personal art style (``render(..., style="outline-poster")``).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .drawing import COLOURS, HAIR_COLOURS, PART_NAMES, SCENES, SIZE, SKIN_TONES, STYLES, draw

__all__ = [
    "ANIMATE", "CLASSES", "COLOURS", "EXPRESSIONS", "FACE_LABELS", "HAIR_COLOURS", "HAIR_LENGTHS", "HAT_COLOURS",
    "NOUN", "PART_NAMES", "PATTERNS", "SCARF_COLOURS", "SCENES", "SIZE", "SKIN_TONES", "STYLES", "SUBJECTS", "WHERE",
    "Rendered", "Scene", "Subject", "describe", "held_out", "held_out_combinations", "render", "sample_pair",
    "sample_scene", "subject_scene",
]

CLASSES = ("dog", "cat", "car", "vase", "teddy bear", "face")
NOUN = {"dog": "dog", "cat": "cat", "car": "car", "vase": "vase", "teddy bear": "teddy bear", "face": "person"}
ANIMATE = ("dog", "cat", "teddy bear", "face")  # classes that can wear accessories
PATTERNS = ("plain", "striped", "spotted", "checkered")
HAT_COLOURS = ("red", "blue", "green", "yellow", "black")
SCARF_COLOURS = ("red", "blue", "yellow", "green")
HAIR_LENGTHS = ("short", "long")
EXPRESSIONS = ("neutral", "smiling")
WHERE = {"grass": "on the grass", "snow": "in the snow", "beach": "on the beach", "city street": "on a city street",
         "night sky": "under the night sky", "water": "in the water", "wooden floor": "on a wooden floor",
         "pink fabric": "on pink fabric"}
# CelebAMask-HQ labels in the order of the SegFormer face parser on the hub (jonathandinu/face-parsing), so the toy
# parser is a drop-in for the real one; the toy world draws a subset of them.
FACE_LABELS = ("background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
               "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
_PART_TO_FACE_LABEL = {"glasses": "eye_g", "hat": "hat", "skin": "skin", "hair": "hair", "l_eye": "l_eye",
                       "r_eye": "r_eye", "mouth": "mouth", "nose": "nose", "neck": "neck", "cloth": "cloth"}


@dataclass(frozen=True)
class Scene:
    """What an image shows. ``subject`` names a personal subject (then its look overrides colour/pattern)."""

    cls: str
    colour: str = "red"
    pattern: str = "plain"
    scene: str = "grass"
    hat: str | None = None  # hat colour
    glasses: bool = False
    scarf: str | None = None  # scarf colour
    hair_colour: str = "black"
    hair_length: str = "short"
    expression: str = "neutral"
    skin: int = 0
    subject: str | None = None
    # pose: scale, shift (pixels), mirror, and a free shape-variation number in [0, 1)
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    flip: bool = False
    shape: float = 0.5
    scene_seed: int = 0

    def labels(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("scale", "dx", "dy", "flip", "shape", "scene_seed")}


@dataclass(frozen=True)
class Subject:
    """A personal subject: a fixed identity the base model has never seen."""

    name: str
    cls: str
    description: str
    fixed: dict = field(default_factory=dict)


SUBJECTS = {
    "dog": Subject("dog", "dog", "a teal dog with magenta ears and tail and a yellow diamond on its side"),
    "car": Subject("car", "car", "a silver car with two orange diagonal racing stripes and a blue star"),
    "face": Subject("face", "face", "a person with a purple bob haircut, a teal shirt and a red mark on the cheek",
                    fixed={"hair_length": "short", "skin": 1}),
}


def held_out(cls: str, colour: str, scene: str) -> bool:
    """About 1 in 9 (class, colour, scene) triples never appear in pretraining; the gates prompt exactly these."""
    if cls == "face":
        return False
    return (CLASSES.index(cls) * 7 + list(COLOURS).index(colour) * 3 + SCENES.index(scene) * 5) % 9 == 4


def held_out_combinations() -> list[tuple[str, str, str]]:
    return [(c, k, s) for c in CLASSES for k in COLOURS for s in SCENES if held_out(c, k, s)]


def sample_scene(rng: random.Random, *, cls: str | None = None, allow_held_out: bool = False,
                 accessory_rate: float = 0.35, **fixed) -> Scene:
    """A random scene of the ordinary world (no personal subject), avoiding held-out triples unless allowed."""
    while True:
        c = cls or rng.choice(CLASSES)
        colour, scene = rng.choice(list(COLOURS)), rng.choice(SCENES)
        if fixed.get("colour"):
            colour = fixed["colour"]
        if fixed.get("scene"):
            scene = fixed["scene"]
        if allow_held_out or not held_out(c, colour, scene):
            break
    animate = c in ANIMATE
    values = dict(
        cls=c, colour=colour, scene=scene,
        pattern=rng.choice(PATTERNS) if c != "face" else "plain",
        hat=rng.choice(HAT_COLOURS) if animate and rng.random() < accessory_rate else None,
        glasses=animate and rng.random() < accessory_rate,
        scarf=rng.choice(SCARF_COLOURS) if animate and rng.random() < accessory_rate else None,
        hair_colour=rng.choice(list(HAIR_COLOURS)), hair_length=rng.choice(HAIR_LENGTHS),
        expression=rng.choice(EXPRESSIONS), skin=rng.randrange(len(SKIN_TONES)),
        scale=rng.uniform(0.85, 1.1), dx=rng.uniform(-6, 6), dy=rng.uniform(-4, 4), flip=rng.random() < 0.5,
        shape=rng.random(), scene_seed=rng.randrange(1 << 30),
    )
    if c == "face":
        values.update(scale=rng.uniform(0.9, 1.05), dx=rng.uniform(-4, 4), dy=rng.uniform(-2, 3))
    values.update({k: v for k, v in fixed.items() if k not in ("colour", "scene")})
    return Scene(**values)


def subject_scene(name: str, rng: random.Random, **overrides) -> Scene:
    """A random view of personal subject ``name`` (pose, scene, accessories vary; identity does not)."""
    subject = SUBJECTS[name]
    base = sample_scene(rng, cls=subject.cls, allow_held_out=True, accessory_rate=0.0)
    return replace(base, subject=name, pattern="plain", **{**subject.fixed, **overrides})


# --------------------------------------------------------------------------------------------------------- rendering


@dataclass
class Rendered:
    """A drawn scene: the image, the visible pixels of each part and the scene itself."""

    image: np.ndarray  # uint8 (64, 64, 3)
    masks: dict[str, np.ndarray]  # part -> bool (64, 64)
    scene: Scene

    def face_label_map(self) -> np.ndarray:
        """Per-pixel index into ``FACE_LABELS`` (what the face parser learns)."""
        out = np.zeros((SIZE, SIZE), np.int64)
        for part, label in _PART_TO_FACE_LABEL.items():
            out[self.masks[part]] = FACE_LABELS.index(label)
        if self.scene.cls != "face":
            out[:] = 0
        return out


def render(s: Scene, style: str | None = None) -> Rendered:
    """Draw a scene. ``style`` is ``None`` (the world's own look), ``"outline-poster"`` or ``"painted"``."""
    if s.cls not in CLASSES:
        raise ValueError(f"unknown class {s.cls!r}; classes: {', '.join(CLASSES)}")
    return Rendered(*draw(s, style), s)


# ----------------------------------------------------------------------------------------------------------- captions

_TEMPLATES = ("a photo of {what}{where}", "a {what}{where}", "a picture of {what}{where}", "{what}{where}",
              "a close-up photo of {what}{where}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(s: Scene, rng: random.Random | None = None, *, full: bool = False) -> str:
    """A natural-English caption. With ``rng``, attributes are sometimes left out (as real captions do)."""
    keep = (lambda p: True) if full or rng is None else (lambda p: rng.random() < p)
    wear = []
    if s.hat and keep(0.9):
        wear.append(f"a {s.hat} hat")
    if s.glasses and keep(0.9):
        wear.append("glasses")
    if s.scarf and keep(0.9):
        wear.append(f"a {s.scarf} scarf")
    if s.cls == "face":
        bits = []
        if keep(0.7):
            bits.append(f"{s.hair_length} {s.hair_colour} hair")
        noun = "smiling person" if s.expression == "smiling" and keep(0.8) else "person"
        what = f"{_article(noun)} {noun}"
        if bits:
            what += " with " + bits[0]
        if keep(0.5):
            what += f" in {_article(s.colour)} {s.colour} shirt"
    else:
        adjectives = []
        if keep(0.85):
            adjectives.append(s.colour)
        if s.pattern != "plain" and keep(0.7):
            adjectives.append(s.pattern)
        phrase = " ".join(adjectives + [NOUN[s.cls]])
        what = f"{_article(phrase)} {phrase}"
    if wear:
        what += " wearing " + (" and ".join(wear) if len(wear) < 3 else f"{wear[0]}, {wear[1]} and {wear[2]}")
    where = f" {WHERE[s.scene]}" if keep(0.85) else ""
    template = _TEMPLATES[0] if rng is None else rng.choice(_TEMPLATES)
    caption = template.format(what=what, where=where)
    if caption.startswith(("a a ", "a an ")):
        caption = caption[2:]
    return caption


def sample_pair(seed: int, **kwargs) -> tuple[np.ndarray, str, Scene]:
    """One pretraining example (image, caption, scene), a pure function of ``seed``."""
    rng = random.Random(seed)
    s = sample_scene(rng, **kwargs)
    return render(s).image, describe(s, rng), s
