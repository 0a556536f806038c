"""The toy world's subject segmenter: a tiny SegFormer that labels each pixel with the world class drawn there.

What: ``python -m t2i_personal.mask DIR --class-noun dog --model builtin:toy-segmenter`` writes subject masks for
toy-world photos through the same transformers calls (``AutoModelForSemanticSegmentation`` + its image processor +
``post_process``-style upsampling) as any hub semantic-segmentation model whose labels include the class noun. Its
labels are ``background`` and the world's nouns (``dog``, ``cat``, ``car``, ``vase``, ``teddy bear``, ``person``).

Why: the masked loss needs masks a user did not draw; the toy world's renders carry exact subject masks, so how
good automatic masks are, and what they cost the masked loss against exact ones, is measured rather than assumed
(the ``auto-masks`` run of ``benchmarks/toyworld_real_photos.py``).

How: :func:`composite` pastes one or two rendered objects over a rendered scene of another object, on portrait,
landscape and square canvases (as users' photos are), then squeezes them to 64×64 (the processor squeezes any
photo to its 128×128 input the same way); every
object's label covers its body and whatever it wears. Each pasted object's hue is rotated at random half of the
time, on its own, so class is read from shape rather than colour: the personal subjects wear colours and markings
no world object has (the teal dog's magenta ears). The personal subjects themselves
are never shown: the evaluation photos are of them. Loss and preprocessing are the face parser's (cross-entropy +
soft Dice; 128×128 input so SegFormer's 1/4-resolution logits are 32×32).

Gate: mean IoU of the six classes on held-out composites (a render seed never used in training) ≥ 0.8.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import write_json_atomic
from . import world
from .face_parser import _versions, fit, iou, load_segformer, parse, save
from .generator import hue_matrix
from .reports import image_grid, save_loss_curve
from .schedule import TrainingClock, reproduce_command

DEFAULT_PATH = Path(__file__).parent / "weights" / "segmenter"
CREATE_COMMAND = "python -m t2i_personal.toyworld.pretrain segmenter"
LABELS = ("background", *(world.NOUN[c] for c in world.CLASSES))
LABEL_OF_CLASS = {c: LABELS.index(world.NOUN[c]) for c in world.CLASSES}
INPUT_SIZE = 128
GATE = 0.8
CANVASES = ((64, 96), (96, 64), (80, 80), (64, 64))  # (width, height): portrait, landscape, square
_PALETTE = np.array([(0, 0, 0), (230, 120, 40), (160, 90, 200), (60, 140, 230), (60, 190, 90), (200, 160, 90),
                     (240, 220, 60)], np.uint8)


def make_config():
    """A tiny SegFormer (~0.4M parameters, under 1 MB in fp16)."""
    from transformers import SegformerConfig

    return SegformerConfig(
        hidden_sizes=[24, 48, 64, 96], num_attention_heads=[1, 2, 2, 3], depths=[1, 1, 1, 1],
        decoder_hidden_size=64, drop_path_rate=0.0, classifier_dropout_prob=0.0, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )


def make_processor():
    from transformers import SegformerImageProcessor

    return SegformerImageProcessor(size={"height": INPUT_SIZE, "width": INPUT_SIZE})


def subject_pixels(rendered: world.Rendered) -> np.ndarray:
    """Bool (64, 64): the object with what it wears (a face: every face part)."""
    if rendered.scene.cls == "face":
        return rendered.face_label_map() > 0
    return rendered.masks["body"] | rendered.masks["hat"] | rendered.masks["glasses"] | rendered.masks["scarf"]


def composite(rng: random.Random, subject: world.Scene | None = None, clutter: int | None = None,
              hue_jitter: float = 0.0):
    """(image uint8 (H, W, 3), label map (H, W)) on a random canvas: a scene of one object stretched to the
    canvas, ``clutter`` (default 0-1) more objects, then ``subject`` (default: a random world object) on top;
    each pasted object's hue rotated with probability ``hue_jitter``."""
    width, height = rng.choice(CANVASES)
    backdrop = world.render(world.sample_scene(rng))
    image = np.asarray(Image.fromarray(backdrop.image).resize((width, height), Image.Resampling.BILINEAR)).copy()
    stretched = Image.fromarray(subject_pixels(backdrop).astype(np.uint8)).resize((width, height),
                                                                                  Image.Resampling.NEAREST)
    labels = np.asarray(stretched).astype(np.int64) * LABEL_OF_CLASS[backdrop.scene.cls]
    scenes = [world.sample_scene(rng) for _ in range(rng.randint(0, 1) if clutter is None else clutter)]
    for scene in [*scenes, subject or world.sample_scene(rng)]:
        drawn = world.render(scene)
        inside = subject_pixels(drawn)
        pixels = drawn.image
        if rng.random() < hue_jitter:
            rotation = hue_matrix(torch.tensor([rng.uniform(0, 2 * math.pi)]))[0]
            pixels = (torch.from_numpy(pixels).float() @ rotation.T).clamp(0, 255).round().to(torch.uint8).numpy()
        x, y = rng.randint(0, width - 64), rng.randint(0, height - 64)
        image[y:y + 64, x:x + 64][inside] = pixels[inside]
        labels[y:y + 64, x:x + 64][inside] = LABEL_OF_CLASS[scene.cls]
    return image, labels


def composite_set(n: int, seed: int, size: int = 64, hue_jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` composites resized to ``size``² (image bilinear, labels nearest), as uint8 (N, s, s, 3) and (N, s, s)."""
    rng = random.Random(seed)
    images, labels = [], []
    for _ in range(n):
        image, label = composite(rng, hue_jitter=hue_jitter)
        images.append(np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)))
        labels.append(np.asarray(Image.fromarray(label.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)))
    return np.stack(images), np.stack(labels)


def _flip(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    flip = torch.rand(len(images), generator=gen, device=images.device) < 0.5
    return (torch.where(flip[:, None, None, None], images.flip(2), images),
            torch.where(flip[:, None, None], labels.flip(2), labels))


def class_iou(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU per world noun over the whole set, plus their ``"mean"``."""
    return iou(pred, truth, LABELS[1:], index={name: i for i, name in enumerate(LABELS)})


def train(out_dir, *, device: str = "cpu", steps: int = 1500, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
          time_budget_s: float | None = None, num_images: int = 6000, eval_images: int = 300,
          hue_jitter: float = 0.5) -> dict:
    """Train from scratch; write the model, ``training.json``, ``loss.png`` and ``samples.png`` to ``out_dir``."""
    settings = {k: v for k, v in locals().items() if k != "out_dir"}
    from transformers import SegformerForSemanticSegmentation

    start = time.time()
    clock = TrainingClock(steps, time_budget_s, warmup=max(1, min(200, steps // 10)))
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    images, labels = composite_set(num_images, seed=seed + 1, hue_jitter=hue_jitter)
    images = torch.from_numpy(images).to(device)
    labels = torch.from_numpy(labels).to(device)
    render_seconds = time.time() - start
    model = SegformerForSemanticSegmentation(make_config()).to(device).train()
    processor = make_processor()
    history, step, loss = fit(model, processor, images, labels, _flip, clock=clock, steps=steps,
                              batch_size=batch_size, lr=lr, generator=gen, device=device, desc="segmenter")
    train_seconds = time.time() - start - render_seconds
    eval_x, eval_y = composite_set(eval_images, seed=seed + 777)  # a render seed training never used
    iou = class_iou(parse(model, processor, eval_x), eval_y)
    out_dir = Path(out_dir)
    save(model, processor, out_dir)
    record = {
        "hyperparameters": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                            "time_budget_s": time_budget_s, "num_images": num_images, "eval_images": eval_images,
                            "hue_jitter": hue_jitter, "input_size": INPUT_SIZE, "device": device,
                            "loss": "cross-entropy + soft Dice"},
        "steps_done": step, "final_loss": loss,
        "seconds": {"render": round(render_seconds, 1), "train": round(train_seconds, 1),
                    "per_step": round(train_seconds / max(step, 1), 4)},
        "held_out_iou": {k: round(v, 4) for k, v in iou.items()},
        "gate": {"mean_iou": round(iou["mean"], 4), "threshold": GATE, "passed": iou["mean"] >= GATE},
        "parameters": sum(p.numel() for p in model.parameters()),
        "reproduce": reproduce_command("segmenter", settings, {"steps": step, "time_budget_s": None}),
        "versions": _versions(),
    }
    write_json_atomic(out_dir / "training.json", record)
    save_loss_curve({"train loss": history}, out_dir / "loss.png", "toy-world subject segmenter (SegFormer)")
    rows = [eval_x[:8], _PALETTE[eval_y[:8]], _PALETTE[parse(model, processor, eval_x[:8])]]
    image_grid(np.concatenate(rows), columns=8, scale=3).save(out_dir / "samples.png")
    return record


def load_segmenter(path=None, device: str = "cpu"):
    """``(model, processor)`` from ``path`` (default: the shipped ``weights/segmenter``), model in eval mode."""
    return load_segformer(path if path is not None else DEFAULT_PATH, CREATE_COMMAND, device)
