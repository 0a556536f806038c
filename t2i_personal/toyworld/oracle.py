"""The oracle: a small CNN, trained on the toy world's exact labels, that reads what a 64×64 image shows.

Benchmarks cannot ask a person whether a generated image shows "a red dog wearing a blue hat on the beach"; they
ask the oracle. It reads the class, the colour (for people: the shirt), the pattern, hat (and its colour), glasses,
scarf, the scene, a person's expression and hair, and whether the image shows one of the personal subjects.

How: a ResNet-ish CNN (32-64-128 channels, 0.62M parameters, 1.2 MB in fp16) with one linear head per attribute on average- and
max-pooled features (max pooling lets a small thing such as glasses count wherever it sits). Heads that only make
sense for some images — pattern for non-people, hair and expression for people, accessories for animate classes,
colour and pattern not for personal subjects (whose look is their own) — are trained with masked losses and read
as ``None``/``False`` where the predicted class says they do not apply. The same table (``_APPLIES``) defines the
training masks, the readings and the accuracies, so the three cannot drift apart.

Why the augmentations: the oracle scores images from a small diffusion model, which are blurrier, noisier and a
little off in colour and position compared with renders. Training only on clean renders would give a reader that is
perfect on renders and brittle on generations. So each training image is, independently and each with some
probability, shifted (±4 px) and mirrored, blurred with a gaussian of random width, given gaussian noise and a mild
brightness/contrast/saturation jitter. The jitter is kept small on purpose: the colour names are part of the labels
(orange and brown, for instance, differ mostly in brightness), so a strong jitter would teach the oracle wrong
colours. About a fifth of the training images stay untouched, so clean renders are read exactly too.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_file, atomic_path, write_json_atomic
from . import world
from .dataset import WorldSet, render_set
from .reports import save_loss_curve
from .schedule import TrainingClock

DEFAULT_DIR = Path(__file__).parent / "weights" / "oracle"
HEADS: dict[str, tuple[str, ...]] = {
    "cls": world.CLASSES,
    "colour": tuple(world.COLOURS),
    "pattern": world.PATTERNS,
    "hat": ("none",) + world.HAT_COLOURS,
    "glasses": ("no", "yes"),
    "scarf": ("no", "yes"),
    "scene": world.SCENES,
    "expression": world.EXPRESSIONS,
    "hair_colour": tuple(world.HAIR_COLOURS),
    "hair_length": world.HAIR_LENGTHS,
    "subject": ("none",) + tuple(world.SUBJECTS),
}
# head -> (cls, subject) -> whether the head means anything for such an image
_APPLIES = {
    "colour": lambda cls, subject: subject is None,
    "pattern": lambda cls, subject: cls != "face" and subject is None,
    "hat": lambda cls, subject: cls in world.ANIMATE,
    "glasses": lambda cls, subject: cls in world.ANIMATE,
    "scarf": lambda cls, subject: cls in world.ANIMATE,
    "expression": lambda cls, subject: cls == "face",
    "hair_colour": lambda cls, subject: cls == "face" and subject is None,
    "hair_length": lambda cls, subject: cls == "face",
}
_TRAIN_SET_SEED, _EVAL_SET_SEED = 4242, 777  # the fixed training set, and fresh renders it never saw
_WARMUP = 100


def _applies(head: str, cls: str, subject: str | None) -> bool:
    return _APPLIES.get(head, lambda c, s: True)(cls, subject)


def _label(head: str, value) -> str:
    """A scene's raw field value as a head label: None -> "none", booleans -> "yes"/"no"."""
    if value is None:
        return "none"
    if head in ("glasses", "scarf"):
        return "yes" if value else "no"
    return str(value)


def _value(head: str, label: str):
    """A head label as the reading's value (the inverse of ``_label``)."""
    if head in ("glasses", "scarf"):
        return label == "yes"
    return None if label == "none" else label


def _not_applicable(head: str):
    return False if head in ("glasses", "scarf") else None


def _raw(s: world.Scene, head: str):
    return bool(s.scarf) if head == "scarf" else getattr(s, head)


def scene_reading(s: world.Scene) -> dict:
    """What a perfect oracle reads from a render of ``s`` (the format of :meth:`Oracle.read`, without probs)."""
    return {h: _value(h, _label(h, _raw(s, h))) if _applies(h, s.cls, s.subject) else _not_applicable(h)
            for h in HEADS}


def label_matrix(scenes: list[world.Scene]) -> np.ndarray:
    """int64 (N, heads): each head's label index, or -1 where the head does not apply (ignored by the loss)."""
    out = np.full((len(scenes), len(HEADS)), -1, np.int64)
    for i, s in enumerate(scenes):
        for j, (h, vocab) in enumerate(HEADS.items()):
            if _applies(h, s.cls, s.subject):
                out[i, j] = vocab.index(_label(h, _raw(s, h)))
    return out


# -------------------------------------------------------------------------------------------------------- the model


class _Block(nn.Module):
    """A basic residual block (two 3×3 convolutions); a strided 1×1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class Oracle(nn.Module):
    """Reads a toy-world image: ``read(images)`` gives one dict of attributes (and their probabilities) per image.

    ``heads`` maps each head to its label names; it is stored in ``config.json`` so a weights folder is readable
    without the code's current vocabularies.
    """

    def __init__(self, heads: dict[str, tuple[str, ...]] | None = None, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        self.heads = {h: tuple(v) for h, v in (heads or HEADS).items()}
        self.channels = tuple(channels)
        c0, c1, c2 = self.channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True),  # 64×64: fine detail
            _Block(c0, c0, 2),  # 32×32
            _Block(c0, c1, 2),  # 16×16
            _Block(c1, c2, 2), _Block(c2, c2, 1))  # 8×8
        self.classifiers = nn.ModuleDict({h: nn.Linear(2 * c2, len(v)) for h, v in self.heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """float (B, 3, 64, 64) in [-1, 1] -> head -> logits (B, labels)."""
        f = self.features(x)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return {h: head(pooled) for h, head in self.classifiers.items()}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------------------------ reading

    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Batched forward pass in eval mode; ``images`` in any form :meth:`read` takes. Returns CPU float tensors."""
        x = as_tensor(images)
        was_training = self.training
        self.eval()
        chunks = [self(x[i:i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return {h: torch.cat([c[h].float().cpu() for c in chunks]) for h in self.heads}

    def read(self, images) -> list[dict]:
        """One reading per image: ``{"cls", "colour", "pattern", "hat" (colour or None), "glasses" (bool),
        "scarf" (bool), "scene", "expression", "hair_colour", "hair_length", "subject" (None or a name),
        "probs": {head: {label: p}}}``.

        Heads that do not apply to the predicted class (or to a personal subject) read ``None`` (``False`` for
        glasses and scarf); their probabilities are still in ``probs``. ``images``: a list of PIL images (any
        size), uint8 array (N, H, W, 3), or float tensor (N, 3, H, W) in [-1, 1].
        """
        probs = {h: logits.softmax(-1) for h, logits in self.logits(images).items()}
        n = len(probs["cls"])
        readings = []
        for i in range(n):
            labels = {h: self.heads[h][int(p[i].argmax())] for h, p in probs.items()}
            cls, subject = labels["cls"], _value("subject", labels["subject"])
            reading = {h: _value(h, labels[h]) if _applies(h, cls, subject) else _not_applicable(h)
                       for h in self.heads}
            reading["probs"] = {h: dict(zip(self.heads[h], p[i].tolist())) for h, p in probs.items()}
            readings.append(reading)
        return readings

    # ------------------------------------------------------------------------------------------------ storage

    def save_pretrained(self, dir: str | Path) -> Path:
        """``config.json`` (head vocabularies, channels) and ``model.safetensors`` (fp16), each written atomically."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(dir / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        write_json_atomic(dir / "config.json", {"model": "toyworld-oracle", "channels": list(self.channels),
                                                "heads": {h: list(v) for h, v in self.heads.items()}})
        return dir

    @classmethod
    def from_pretrained(cls, dir: str | Path | None = None, device: str | torch.device = "cpu") -> Oracle:
        """Load in float32, eval mode. ``dir`` defaults to the weights shipped with the package."""
        dir = Path(dir) if dir is not None else DEFAULT_DIR
        config, weights = dir / "config.json", dir / "model.safetensors"
        if not (config.is_file() and weights.is_file()):
            raise FileNotFoundError(f"no oracle weights at {dir} (config.json + model.safetensors); "
                                    "train them with `python -m t2i_personal.toyworld.pretrain oracle`")
        cfg = json.loads(config.read_text())
        model = cls(heads=cfg["heads"], channels=tuple(cfg["channels"]))
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        model.load_state_dict(state)
        return model.to(device).eval()


def as_tensor(images) -> torch.Tensor:
    """PIL images / uint8 array (N, H, W, 3) / float tensor (N, 3, H, W) in [-1, 1] -> float (N, 3, 64, 64)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.shape[-2:] != (world.SIZE, world.SIZE):
            x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="bicubic", antialias=True, align_corners=False)
        return x.clamp(-1, 1)
    if isinstance(images, np.ndarray) and images.shape[1:3] == (world.SIZE, world.SIZE):
        array = images
    else:
        pics = [Image.fromarray(i) if isinstance(i, np.ndarray) else i for i in images]
        array = np.stack([np.asarray(p.convert("RGB").resize((world.SIZE, world.SIZE), Image.BICUBIC)) for p in pics])
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------- augmentation


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` (B, C, H, W) with its own gaussian width ``sigma`` (B,) in pixels; σ≈0 is a no-op."""
    b, c, h, w = x.shape
    r = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.to(x.dtype).clamp_min(1e-2)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 7)
    y = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift (±4 px) + mirror, mild colour jitter, gaussian blur and noise, each per image (see module doc)."""
    b, dev = len(x), x.device

    def u(lo, hi, p=1.0):  # per-image uniform draw, or the neutral value where the coin (prob p) says no
        value = lo + (hi - lo) * torch.rand(b, device=dev, generator=g)
        return torch.where(torch.rand(b, device=dev, generator=g) < p, value, torch.zeros_like(value))

    shift = torch.randint(-4, 5, (b, 2), device=dev, generator=g).float() * (2.0 / world.SIZE)
    mirror = torch.where(torch.rand(b, device=dev, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = mirror, 1.0, shift  # integer shifts: no resampling blur
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * (1 + u(-0.15, 0.15, 0.5))[:, None, None, None]  # saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (1 + u(-0.1, 0.1, 0.5))[:, None, None, None]  # contrast
    x = x + u(-0.06, 0.06, 0.5)[:, None, None, None]  # brightness (±8/255)
    x = gaussian_blur(x, u(0.3, 1.6, 0.5))
    x = x + u(0.0, 0.08, 0.5)[:, None, None, None] * torch.randn(x.shape, device=dev, generator=g)
    return x.clamp(-1, 1)


# --------------------------------------------------------------------------------------------------- training


def _loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy over the images where the head applies (label -1 is masked).

    Written without data-dependent branches so a GPU never waits on the host (a batch may lack faces: that
    head then adds 0)."""
    total = torch.zeros((), device=labels.device)
    for j, h in enumerate(HEADS):
        y = labels[:, j]
        mask = (y >= 0).float()
        ce = F.cross_entropy(logits[h].float(), y.clamp_min(0), reduction="none")
        total = total + (ce * mask).sum() / mask.sum().clamp_min(1.0)
    return total


def _accuracy(oracle: Oracle, data: WorldSet, blur: float = 0.0) -> dict[str, float]:
    x = data.tensor(slice(None))
    if blur:
        x = gaussian_blur(x, torch.full((len(x),), blur))
    predicted = oracle.logits(x)
    labels = torch.from_numpy(label_matrix(data.scenes))
    out = {}
    for j, h in enumerate(HEADS):
        mask = labels[:, j] >= 0
        if mask.any():
            out[h] = float((predicted[h].argmax(1)[mask] == labels[mask, j]).float().mean())
    return out


def accuracy(oracle: Oracle, *, n: int = 500, seed: int = _EVAL_SET_SEED, blur: float = 0.0) -> dict[str, float]:
    """Accuracy per head on ``n`` fresh renders (``kind="oracle"``), each head over the images where it applies.

    ``blur`` (gaussian σ in pixels) blurs the renders first, a stand-in for a generator's softness.
    """
    return _accuracy(oracle, render_set(n, seed=seed, kind="oracle"), blur)


def train(out_dir: str | Path, *, device: str = "cpu", steps: int = 3000, batch_size: int = 256, lr: float = 2e-3,
          seed: int = 0, time_budget_s: float | None = None, num_images: int = 40000, workers: int | None = None,
          eval_images: int = 2000) -> dict:
    """Train an oracle from scratch on a fixed rendered set and write it, with a report, to ``out_dir``.

    Stops after ``steps`` or when the training loop has run ``time_budget_s`` seconds (rendering not counted).
    Writes the weights (``save_pretrained``), ``training.json``, ``loss.png`` and ``samples.png``; returns the
    ``training.json`` contents. Accuracies are those of the saved fp16 weights on ``eval_images`` fresh renders.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    start = time.time()
    torch.manual_seed(seed)
    data = render_set(num_images, seed=_TRAIN_SET_SEED, kind="oracle", workers=workers)
    held = render_set(eval_images, seed=_EVAL_SET_SEED, kind="oracle", workers=workers)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 on the device
    labels = torch.from_numpy(label_matrix(data.scenes)).to(device)
    render_s = time.time() - start

    model = Oracle().to(device).train()
    weight_decay = 0.05
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    history, step, loop_start = [], 0, time.time()
    bar = tqdm(total=steps, desc="oracle", unit="step")
    clock = TrainingClock(steps, time_budget_s, warmup=_WARMUP, floor=0.0)
    while clock.running(step):
        for group in opt.param_groups:
            group["lr"] = lr * clock.lr_factor(step)
        idx = torch.randint(len(images), (batch_size,), device=device, generator=g)
        x = augment(images[idx].float() / 127.5 - 1.0, g)
        with autocast:
            loss = _loss(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0 or step == steps:
            history.append((step, loss.item()))
            bar.set_postfix(loss=f"{history[-1][1]:.3f}")
        bar.update(1)
    bar.close()
    train_s = time.time() - loop_start

    model.eval().save_pretrained(out_dir)
    shipped = Oracle.from_pretrained(out_dir, device=device)
    report = {
        "hyperparameters": {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                            "warmup_steps": _WARMUP, "seed": seed, "time_budget_s": time_budget_s,
                            "num_images": num_images, "eval_images": eval_images,
                            "train_set_seed": _TRAIN_SET_SEED, "eval_set_seed": _EVAL_SET_SEED},
        "steps_done": step,
        "seconds": {"render": round(render_s, 1), "train": round(train_s, 1),
                    "per_step": round(train_s / max(step, 1), 4)},
        "final_loss": float(np.mean([v for _, v in history[-10:]])) if history else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "accuracy": _accuracy(shipped, held),
        "accuracy_blur_1px": _accuracy(shipped, held, blur=1.0),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    report["seconds"]["total"] = round(time.time() - start, 1)
    write_json_atomic(out_dir / "training.json", report)
    save_loss_curve({"loss (sum over heads)": history}, out_dir / "loss.png", "oracle training")
    sample_sheet(shipped, held, out_dir / "samples.png")
    return report


# ------------------------------------------------------------------------------------------------------ pictures


def _lines(reading: dict, truth: dict) -> list[list[tuple[str, str]]]:
    """A reading as short lines of (head, text) pieces, for drawing under an image; missed accessories included."""
    face = reading["cls"] == "face"
    lines = [[("cls", reading["cls"])] + ([("subject", f"= {reading['subject']}")] if reading["subject"] else []),
             [(h, reading[h] + (" shirt" if face and h == "colour" else "")) for h in ("colour", "pattern")
              if reading[h]],
             [("scene", reading["scene"])]]
    worn = [("hat", f"{reading['hat']} hat")] if reading["hat"] else []
    worn += [(h, h) for h in ("glasses", "scarf") if reading[h]]
    worn += [(h, f"no {h}") for h in ("hat", "glasses", "scarf") if truth[h] and not reading[h]]
    lines.append(worn)
    if face:
        hair = [(h, reading[h]) for h in ("hair_length", "hair_colour") if reading[h]]
        hair[-1] = (hair[-1][0], hair[-1][1] + " hair")
        lines.append([("expression", reading["expression"])] + hair)
    return lines


def sample_sheet(oracle: Oracle, data: WorldSet, path: str | Path, n: int = 24, columns: int = 6) -> Path:
    """Images with the oracle's reading under each (2× size); pieces that disagree with the truth are red."""
    n = min(n, len(data))
    readings = oracle.read(data.images[:n])
    scale, text_h, pad = 2, 62, 4
    tile_w, tile_h = world.SIZE * scale + 2 * pad, world.SIZE * scale + text_h
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    for i, reading in enumerate(readings):
        x0, y0 = (i % columns) * tile_w + pad, (i // columns) * tile_h
        sheet.paste(Image.fromarray(data.images[i]).resize((world.SIZE * scale,) * 2, Image.NEAREST), (x0, y0 + pad))
        truth = scene_reading(data.scenes[i])
        y = y0 + pad + world.SIZE * scale + 2
        for line in _lines(reading, truth):
            x = x0
            for head, text in line:
                draw.text((x, y), text, fill="black" if reading[head] == truth[head] else "red", font=font)
                x += draw.textlength(text, font=font) + 4
            y += 11
    with atomic_file(path, "wb") as handle:
        sheet.save(handle, format="PNG")
    return Path(path)
