"""How the toy world is painted: backgrounds, the six classes, accessories and the two art styles.

Drawing happens on a 2× supersampled canvas that is box-filtered down, which gives anti-aliased edges that a small
VAE can reconstruct; every canvas pixel remembers which part painted it last, so part masks are the visible (after
occlusion) pixels of each part. ``s`` is always a :class:`.world.Scene`; this module only reads its fields, so it
does not import :mod:`.world` (which builds on it).
"""

from __future__ import annotations

import math

import numpy as np

SIZE = 64
_SS = 2  # supersampling factor
COLOURS = {
    "red": (206, 38, 38), "orange": (240, 130, 20), "yellow": (240, 212, 40), "green": (40, 150, 50),
    "blue": (40, 80, 210), "purple": (130, 50, 170), "white": (240, 240, 240), "black": (30, 30, 30),
    "brown": (120, 72, 36),
}
HAIR_COLOURS = {"black": (25, 20, 20), "brown": (105, 60, 30), "blonde": (235, 200, 100), "red": (190, 60, 25),
                "white": (225, 225, 225)}
SKIN_TONES = ((240, 200, 170), (205, 150, 110), (140, 95, 65))
SCENES = ("grass", "snow", "beach", "city street", "night sky", "water", "wooden floor", "pink fabric")
PART_NAMES = ("body", "hat", "glasses", "scarf", "skin", "hair", "l_eye", "r_eye", "mouth", "nose", "neck", "cloth")
STYLES = ("outline-poster", "painted")


def draw(s, style: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8 (64, 64, 3) image and part -> bool (64, 64) masks of scene ``s`` (a known class) in ``style``."""
    canvas = _Canvas()
    _draw_scene(canvas, s.scene, s.scene_seed)
    frame = _Frame(canvas, s)
    anchors = _DRAW[s.cls](frame, s, COLOURS[s.colour], s.pattern, s.subject is not None)
    _draw_accessories(frame, s, anchors)  # only the animate classes return anchors
    image, masks = canvas.result()
    if style == "outline-poster":
        owner = canvas.owner.reshape(SIZE, _SS, SIZE, _SS)[:, 0, :, 0]
        image = _outline_poster(image, owner)
    elif style == "painted":
        image = _painted(image)
    elif style is not None:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    return image, masks


class _Canvas:
    """A 2× supersampled RGB canvas that tracks which part owns each pixel."""

    def __init__(self):
        n = SIZE * _SS
        coords = (np.arange(n, dtype=np.float32) + 0.5) / _SS
        self.x, self.y = np.meshgrid(coords, coords)
        self.rgb = np.zeros((n, n, 3), np.float32)
        self.owner = np.zeros((n, n), np.int8)  # 0 = background, else 1 + PART_NAMES index

    def paint(self, mask: np.ndarray, colour, part: str | None = None):
        self.rgb[mask] = colour
        if part is not None:
            self.owner[mask] = 1 + PART_NAMES.index(part)

    def tint(self, mask: np.ndarray, colour):
        self.rgb[mask] = colour

    def result(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = SIZE
        rgb = self.rgb.reshape(n, _SS, n, _SS, 3).mean(axis=(1, 3))
        image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        # Each output pixel belongs to the owner of most of its sub-pixels (background included), so masks never overlap.
        blocks = self.owner.reshape(n, _SS, n, _SS)
        counts = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(len(PART_NAMES) + 1)])
        winner = counts.argmax(axis=0)
        return image, {name: winner == i + 1 for i, name in enumerate(PART_NAMES)}


class _Frame:
    """Maps object-space coordinates (a 64-unit box, y down) through scale, shift and mirror."""

    def __init__(self, canvas: _Canvas, s, anchor=(32.0, 36.0)):
        self.c, self.s = canvas, s
        ax, ay = anchor
        x = (canvas.x - ax - s.dx) / s.scale
        self.u = (-x if s.flip else x) + ax
        self.v = (canvas.y - ay - s.dy) / s.scale + ay

    def ellipse(self, cx, cy, rx, ry, angle=0.0):
        du, dv = self.u - cx, self.v - cy
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            du, dv = du * ca + dv * sa, -du * sa + dv * ca
        return (du / rx) ** 2 + (dv / ry) ** 2 <= 1.0

    def rect(self, x0, y0, x1, y1):
        return (self.u >= x0) & (self.u <= x1) & (self.v >= y0) & (self.v <= y1)

    def polygon(self, points):
        """Even-odd fill of a polygon given in object space."""
        inside = np.zeros(self.u.shape, bool)
        pts = list(points)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            crosses = (y0 > self.v) != (y1 > self.v)
            with np.errstate(divide="ignore", invalid="ignore"):
                xc = x0 + (self.v - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (self.u < xc)
        return inside

    def ring(self, cx, cy, r_out, r_in):
        d = (self.u - cx) ** 2 + (self.v - cy) ** 2
        return (d <= r_out**2) & (d >= r_in**2)

    def thick_line(self, x0, y0, x1, y1, width):
        px, py = self.u - x0, self.v - y0
        dx, dy = x1 - x0, y1 - y0
        t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0, 1)
        return (px - t * dx) ** 2 + (py - t * dy) ** 2 <= (width / 2) ** 2


def _shade(colour, k):
    return tuple(min(255.0, c * k) for c in colour)


def _pattern_colours(colour):
    base = np.array(colour, np.float32)
    dark = base.mean() < 80
    return base, (np.minimum(base + 120, 255) if dark else base * 0.45)


def _apply_pattern(f: _Frame, mask, colour, pattern: str, part="body"):
    base, second = _pattern_colours(colour)
    f.c.paint(mask, base, part)
    if pattern == "striped":
        f.c.tint(mask & (np.floor((f.u + f.v * 0.35) / 4.0) % 2 == 1), second)
    elif pattern == "spotted":
        su, sv = (f.u % 8.0) - 4.0, ((f.v + 4.0 * (np.floor(f.u / 8.0) % 2)) % 8.0) - 4.0
        f.c.tint(mask & (su**2 + sv**2 <= 4.0), second)
    elif pattern == "checkered":
        f.c.tint(mask & ((np.floor(f.u / 5.0) + np.floor(f.v / 5.0)) % 2 == 1), second)


def _draw_scene(c: _Canvas, scene: str, seed: int):
    rng = np.random.default_rng(seed)
    x, y = c.x, c.y
    jitter = rng.uniform(-4, 4)
    horizon = 26 + jitter
    if scene == "grass":
        c.rgb[:] = (150, 200, 240)
        ground = y > horizon
        c.rgb[ground] = (70, 150, 60)
        blades = ground & (np.sin(x * 2.3 + rng.uniform(0, 6)) * np.sin(y * 0.9) > 0.6)
        c.rgb[blades] = (50, 120, 45)
    elif scene == "snow":
        c.rgb[:] = (175, 190, 210)
        c.rgb[y > horizon + 3 * np.sin(x / 9 + jitter)] = (245, 248, 252)
        flakes = np.sin(x * 3.1 + rng.uniform(0, 6)) * np.sin(y * 2.7 + rng.uniform(0, 6)) > 0.93
        c.rgb[flakes] = (255, 255, 255)
    elif scene == "beach":
        c.rgb[:] = (135, 200, 245)
        c.rgb[y > horizon - 6] = (30, 120, 190)
        c.rgb[y > horizon + 6 + 2 * np.sin(x / 6 + jitter)] = (235, 210, 150)
    elif scene == "city street":
        c.rgb[:] = (160, 170, 185)
        for bx in range(0, 64, 10):
            h = rng.uniform(8, 24)
            building = (x >= bx) & (x < bx + 9) & (y < horizon) & (y > horizon - h)
            c.rgb[building] = (90 + 10 * (bx % 3), 90, 100)
            windows = building & (x % 3 < 1.2) & (y % 4 < 1.6)
            c.rgb[windows] = (230, 220, 120)
        c.rgb[y >= horizon] = (70, 70, 75)
        c.rgb[(y >= horizon + 14) & (y < horizon + 15.5) & (x % 10 < 5)] = (240, 240, 240)
    elif scene == "night sky":
        c.rgb[:] = (15, 20, 60)
        stars = rng.uniform(0, 64, (14, 2))
        for sx, sy in stars:
            c.rgb[(x - sx) ** 2 + (y - sy) ** 2 < 0.45] = (255, 255, 220)
        mx, my = rng.uniform(8, 56), rng.uniform(5, 14)
        c.rgb[(x - mx) ** 2 + (y - my) ** 2 < 16] = (245, 240, 200)
        c.rgb[y > horizon + 14] = (25, 30, 45)
    elif scene == "water":
        c.rgb[:] = (40, 110, 180)
        waves = np.sin(x / 3 + 2 * np.sin(y / 5) + rng.uniform(0, 6)) > 0.85
        c.rgb[waves] = (140, 200, 235)
    elif scene == "wooden floor":
        c.rgb[:] = (200, 190, 170)
        floor = y > horizon - 6
        plank = np.floor(y / 6)
        c.rgb[floor] = (150, 95, 50)
        c.rgb[floor & (plank % 2 == 1)] = (170, 110, 60)
        c.rgb[floor & (y % 6 < 0.6)] = (90, 55, 30)
    elif scene == "pink fabric":
        c.rgb[:] = (240, 160, 190)
        folds = np.sin((x + 0.5 * y) / 4 + rng.uniform(0, 6)) > 0.55
        c.rgb[folds] = (215, 125, 160)
    else:
        raise ValueError(f"unknown scene {scene!r}; scenes: {', '.join(SCENES)}")


def _draw_dog(f: _Frame, s, colour, pattern, subject: bool):
    w = s.shape
    legs = f.rect(19, 40, 23, 52) | f.rect(26, 40, 30, 52) | f.rect(37, 40, 41, 52) | f.rect(44, 40, 48, 52)
    body = f.ellipse(33, 36, 16, 8 + 2 * w)
    tail = f.thick_line(18, 33, 11, 22 + 4 * w, 3)
    head = f.ellipse(49, 26, 7, 6.5)
    snout = f.ellipse(56, 29, 4, 3)
    ears = f.ellipse(45, 26, 2.6, 6, angle=0.3)
    silhouette = legs | body | tail | head | snout
    if subject:  # teal coat, magenta ears + tail, yellow diamond marking
        f.c.paint(silhouette, (0, 150, 150), "body")
        f.c.paint(tail, (220, 40, 180), "body")
        f.c.tint(f.polygon([(32, 30), (36, 36), (32, 42), (28, 36)]), (250, 220, 40))
        f.c.paint(ears, (220, 40, 180), "body")
    else:
        _apply_pattern(f, silhouette, colour, pattern)
        f.c.paint(ears, _shade(colour, 0.6) if np.mean(colour) > 80 else (90, 90, 90), "body")
    f.c.tint(f.ellipse(60, 28.5, 1.3, 1.3), (10, 10, 10))
    f.c.tint(f.ellipse(51, 24, 1.1, 1.1), (10, 10, 10))
    return {"hat": (49, 19.5, 7), "eyes": (51, 24, 2.6), "neck": (44, 31, 5)}


def _draw_cat(f: _Frame, s, colour, pattern, subject: bool):
    w = s.shape
    body = f.ellipse(32, 42, 11, 13)
    head = f.ellipse(32, 23, 8.5, 7.5)
    ears = f.polygon([(24, 21), (26, 10 + 2 * w), (30, 17)]) | f.polygon([(40, 21), (38, 10 + 2 * w), (34, 17)])
    tail = f.thick_line(42, 52, 50, 40 - 6 * w, 3) | f.thick_line(50, 40 - 6 * w, 49, 30 - 6 * w, 3)
    paws = f.ellipse(27, 54, 3.5, 2.2) | f.ellipse(37, 54, 3.5, 2.2)
    _apply_pattern(f, body | head | ears | tail | paws, colour, pattern)
    for ex in (28.5, 35.5):
        f.c.tint(f.ellipse(ex, 22, 1.4, 1.8), (40, 180, 60))
        f.c.tint(f.ellipse(ex, 22, 0.5, 1.5), (5, 5, 5))
    f.c.tint(f.polygon([(31, 25), (33, 25), (32, 26.5)]), (230, 110, 130))
    return {"hat": (32, 16, 7), "eyes": (32, 22, 3.5), "neck": (32, 31, 7)}


def _draw_teddy(f: _Frame, s, colour, pattern, subject: bool):
    body = f.ellipse(32, 42, 12, 12)
    head = f.ellipse(32, 23, 9, 8.5)
    ears = f.ellipse(24, 15.5, 3.6, 3.6) | f.ellipse(40, 15.5, 3.6, 3.6)
    arms = f.ellipse(20, 40, 4, 7, angle=0.5) | f.ellipse(44, 40, 4, 7, angle=-0.5)
    feet = f.ellipse(25, 54, 5, 3.5) | f.ellipse(39, 54, 5, 3.5)
    _apply_pattern(f, body | head | ears | arms | feet, colour, pattern)
    f.c.tint(f.ellipse(32, 26, 4.2, 3.2), (235, 215, 180))
    f.c.tint(f.ellipse(32, 25, 1.5, 1.1), (20, 15, 10))
    for ex in (28.5, 35.5):
        f.c.tint(f.ellipse(ex, 21, 1.2, 1.2), (10, 10, 10))
    f.c.tint(f.ellipse(32, 43, 6, 6.5), _shade(_pattern_colours(colour)[0], 1.25))
    return {"hat": (32, 15.5, 8), "eyes": (32, 21, 3.5), "neck": (32, 31.5, 7)}


def _draw_car(f: _Frame, s, colour, pattern, subject: bool):
    w = s.shape
    lower = f.ellipse(32, 40, 24, 6.5) | f.rect(9, 36, 55, 44)
    cabin = f.polygon([(18, 36), (24 + 3 * w, 25), (42 - 3 * w, 25), (49, 36)])
    if subject:  # silver livery, two orange diagonal stripes, a blue star on the door
        f.c.paint(lower | cabin, (190, 195, 200), "body")
        for off in (0, 6):
            f.c.tint((lower | cabin) & (np.abs((f.u - 20 - off) - (40 - f.v) * 0.8) < 1.6), (245, 130, 20))
        star = [(36 + 3.5 * math.cos(a) * (1 if i % 2 == 0 else 0.45), 39 + 3.5 * math.sin(a) * (1 if i % 2 == 0 else 0.45))
                for i, a in enumerate(np.linspace(-math.pi / 2, 3 * math.pi / 2, 10, endpoint=False))]
        f.c.tint(f.polygon(star), (40, 70, 220))
    else:
        _apply_pattern(f, lower | cabin, colour, pattern)
    window = f.polygon([(21, 35), (25.5 + 3 * w, 27), (40.5 - 3 * w, 27), (46, 35)])
    f.c.tint(window, (170, 215, 240))
    f.c.tint(f.rect(32.5, 27, 33.5, 35), (60, 60, 60))
    for wx in (20, 45):
        f.c.paint(f.ellipse(wx, 46, 5.2, 5.2), (25, 25, 25), "body")
        f.c.paint(f.ellipse(wx, 46, 2.2, 2.2), (170, 170, 170), "body")
    f.c.tint(f.ellipse(54, 38, 1.6, 1.2), (250, 240, 150))


def _draw_vase(f: _Frame, s, colour, pattern, subject: bool):
    w = s.shape
    bulb = f.ellipse(32, 42, 12 + 3 * w, 12)
    neck = f.rect(27.5 - w, 18, 36.5 + w, 34)
    lip = f.ellipse(32, 17.5, 7 + w, 2.2)
    foot = f.rect(25, 51, 39, 55)
    _apply_pattern(f, bulb | neck | lip | foot, colour, pattern)
    f.c.tint(f.ellipse(32, 17.5, 4.5 + w, 1.1), (40, 30, 25))
    f.c.tint(f.ellipse(25, 38, 1.5, 5, angle=0.3), _shade(_pattern_colours(colour)[0], 1.35))


def _draw_face(f: _Frame, s, colour, pattern, subject: bool):
    skin = SKIN_TONES[s.skin]
    hair_rgb = (135, 60, 200) if subject else HAIR_COLOURS[s.hair_colour]
    long_hair = s.hair_length == "long"
    shirt = (0, 150, 150) if subject else _shade(COLOURS[s.colour], 1.0)
    if long_hair:
        f.c.paint(f.rect(17, 22, 47, 52) & f.ellipse(32, 36, 16, 22), hair_rgb, "hair")
    f.c.paint(f.ellipse(32, 63, 24, 12), shirt, "cloth")
    f.c.paint(f.rect(27.5, 40, 36.5, 53) & ~f.ellipse(32, 63, 24, 12), skin, "neck")
    f.c.paint(f.ellipse(32, 31, 12, 14.5), skin, "skin")
    f.c.paint(f.ellipse(19.8, 32, 2, 3.2) | f.ellipse(44.2, 32, 2, 3.2), _shade(skin, 0.92), "skin")
    top = f.ellipse(32, 24, 13.5, 10.5) & (f.v < 22 + 2 * s.shape)
    if subject:  # a bob with a straight fringe
        top = (f.ellipse(32, 26, 14.5, 13) & (f.v < 23)) | (f.rect(17.5, 22, 21, 36) | f.rect(43, 22, 46.5, 36))
    f.c.paint(top, hair_rgb, "hair")
    eyes = (("r_eye", 27), ("l_eye", 37)) if s.flip else (("l_eye", 27), ("r_eye", 37))
    for name, ex in eyes:  # labels follow the image side, so a mirrored face swaps the names
        f.c.paint(f.ellipse(ex, 30, 2.4, 1.5), (250, 250, 250), name)
        f.c.paint(f.ellipse(ex, 30, 1.1, 1.3), (70, 50, 30) if not subject else (40, 140, 60), name)
    f.c.paint(f.polygon([(32, 31), (30.3, 37), (33.7, 37)]), _shade(skin, 0.85), "nose")
    if s.expression == "smiling":
        mouth = f.ellipse(32, 40, 5, 3) & (f.v > 40)
        f.c.paint(mouth, (170, 40, 50), "mouth")
        f.c.tint(mouth & (f.v < 41.2), (250, 250, 250))
    else:
        f.c.paint(f.rect(28.5, 41, 35.5, 42.3), (150, 60, 60), "mouth")
    if subject:
        f.c.tint(f.ellipse(38.5, 37, 1.3, 1.3), (210, 30, 30))
    return {"hat": (32, 18, 13), "eyes": (32, 30, 5), "neck": (32, 47, 8), "face": True}


_DRAW = {"dog": _draw_dog, "cat": _draw_cat, "teddy bear": _draw_teddy, "car": _draw_car, "vase": _draw_vase,
         "face": _draw_face}


def _draw_accessories(f: _Frame, s, anchors):
    if anchors is None:
        return
    face = anchors.get("face", False)
    if s.scarf:
        nx, ny, nw = anchors["neck"]
        scarf = f.ellipse(nx, ny, nw, 2.4 if not face else 3)
        tail = f.rect(nx - nw * 0.5, ny, nx - nw * 0.5 + 3, ny + (9 if not face else 7))
        f.c.paint(scarf | tail, COLOURS[s.scarf], "scarf")
        f.c.tint((scarf | tail) & (np.floor(f.u / 2) % 2 == 1), _shade(COLOURS[s.scarf], 0.7))
    if s.glasses:
        ex, ey, half = anchors["eyes"]
        r = 2.9 if face else 2.1
        lenses = f.ellipse(ex - half, ey, r, r) | f.ellipse(ex + half, ey, r, r)
        f.c.paint(lenses, (200, 225, 235), "glasses")
        frame = f.ring(ex - half, ey, r, r - 0.9) | f.ring(ex + half, ey, r, r - 0.9)
        frame |= f.rect(ex - half + r - 0.5, ey - 0.6, ex + half - r + 0.5, ey + 0.4)
        f.c.paint(frame, (15, 15, 15), "glasses")
    if s.hat:
        hx, hy, hw = anchors["hat"]
        rgb = COLOURS[s.hat]
        brim = f.ellipse(hx, hy, hw, 1.8)
        crown = f.rect(hx - hw * 0.6, hy - hw * 0.85, hx + hw * 0.6, hy)
        f.c.paint(brim | crown, rgb, "hat")
        f.c.tint(f.rect(hx - hw * 0.6, hy - 2.2, hx + hw * 0.6, hy - 0.8), _shade(rgb, 0.55) if np.mean(rgb) > 60 else (200, 200, 200))


def _outline_poster(image: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The personal art style: 3-level posterised palette, thick dark outlines around every region."""
    levels = np.array([20, 130, 245], np.float32)
    poster = levels[np.clip(np.rint(image.astype(np.float32) / 127.5), 0, 2).astype(int)]
    region = owner.astype(np.int32) * 256 + (image.astype(np.int32) // 64).sum(-1)
    edge = np.zeros(region.shape, bool)
    edge[1:] |= region[1:] != region[:-1]
    edge[:, 1:] |= region[:, 1:] != region[:, :-1]
    thick = edge.copy()
    thick[1:] |= edge[:-1]
    thick[:, 1:] |= edge[:, :-1]
    poster[thick] = (15, 10, 30)
    return poster.astype(np.uint8)


def _painted(image: np.ndarray) -> np.ndarray:
    """A generic 'digital painting' look for StyleForge's auxiliary images: soft strokes, warm glaze."""
    img = image.astype(np.float32)
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9.0
    glaze = blurred * 0.85 + np.array([250, 200, 140], np.float32) * 0.15
    return np.clip(glaze, 0, 255).astype(np.uint8)
