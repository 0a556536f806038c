"""The toy world's face parser: a tiny SegFormer, saved in the exact format of the hub's ``jonathandinu/face-parsing``.

What: a per-pixel classifier of 64×64 toy-world faces into ``world.FACE_LABELS`` (skin, nose, eyes, glasses, hair,
hat, neck, cloth, ...). FreeCure's mask code asks a face parser for the hair / glasses / hat regions of a generated
face; with this model it runs on toy-world images through the same calls a user makes for the real parser
(``SegformerForSemanticSegmentation.from_pretrained`` + ``SegformerImageProcessor.from_pretrained`` +
``post_process_semantic_segmentation``), so no code path is special-cased for the toy world.

Why the label order: ``FACE_LABELS`` is CelebAMask-HQ's list in the order the hub parser's ``id2label`` uses, so a
label id means the same thing for both parsers and code written against one works with the other.

How: :func:`train` renders a fixed set of faces with exact label maps, upsamples them 2× (the processor's
``size`` is 128×128: SegFormer predicts at 1/4 of its input, so 64×64 inputs would leave 16×16 logits and lose
glasses frames and hair edges), and trains from scratch with cross-entropy plus a soft Dice term (Dice weighs every
class present equally, so the small parts — glasses, eyes, hat — are not drowned by background and skin). Logits
are upsampled bilinearly to 64×64 for the loss, exactly as ``post_process_semantic_segmentation`` does at inference.

Gate: :func:`mean_iou` over hair, glasses (``eye_g``) and hat on freshly rendered faces (a seed never used in
training) must reach 0.7.
"""

from __future__ import annotations

import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from . import world
from .reports import image_grid, save_loss_curve
from .schedule import TrainingClock

DEFAULT_PATH = Path(__file__).parent / "weights" / "face-parser"
CREATE_COMMAND = "python -m t2i_personal.toyworld.pretrain face-parser"
INPUT_SIZE = 128  # the processor upsamples the 64×64 images to this before the model sees them
GATE_LABELS = ("hair", "eye_g", "hat")
GATE = 0.7
# The labels the toy world actually draws (the rest of CelebAMask-HQ's list never occurs in it).
DRAWN_LABELS = ("background", "skin", "nose", "eye_g", "l_eye", "r_eye", "mouth", "hair", "hat", "neck", "cloth")
FACE_INDEX = {name: i for i, name in enumerate(world.FACE_LABELS)}  # label name -> id, as the model's label2id
_L_EYE, _R_EYE, _NOSE = FACE_INDEX["l_eye"], FACE_INDEX["r_eye"], FACE_INDEX["nose"]
_PALETTE = np.array([
    (0, 0, 0), (230, 190, 160), (255, 120, 0), (0, 230, 255), (0, 90, 255), (255, 0, 200), (120, 80, 40),
    (80, 120, 40), (200, 100, 100), (100, 100, 200), (255, 0, 0), (255, 120, 160), (160, 0, 60), (120, 60, 10),
    (0, 200, 0), (200, 200, 0), (150, 150, 255), (150, 120, 90), (90, 90, 90)], np.uint8)


def make_config():
    """A tiny SegFormer (~1M parameters, ~2 MB in fp16) with the hub parser's labels, so ids mean the same."""
    from transformers import SegformerConfig

    return SegformerConfig(
        hidden_sizes=[32, 64, 96, 128], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 2, 1],
        decoder_hidden_size=96, drop_path_rate=0.0, classifier_dropout_prob=0.0,
        num_labels=len(FACE_INDEX), id2label=dict(enumerate(world.FACE_LABELS)), label2id=FACE_INDEX,
    )


def make_processor():
    """The real parser's processor settings (ImageNet normalisation, bilinear resize), but at 128×128 not 512×512."""
    from transformers import SegformerImageProcessor

    return SegformerImageProcessor(size={"height": INPUT_SIZE, "width": INPUT_SIZE})


def image_side_eyes(labels: torch.Tensor) -> torch.Tensor:
    """Relabel eye pixels so ``l_eye`` is the eye on the image's left of the nose and ``r_eye`` the other one.

    The convention is the world's ("labels follow image side"); re-deriving it from positions keeps the labels
    right after a horizontal flip and on mirrored scenes, and is a no-op on labels that already follow it.
    """
    eye = (labels == _L_EYE) | (labels == _R_EYE)
    nose = (labels == _NOSE).float()
    x = torch.arange(labels.shape[-1], device=labels.device).float().expand(labels.shape)
    centre = (x * nose).sum((-2, -1)) / nose.sum((-2, -1)).clamp(min=1)
    left = x < centre[..., None, None]
    return torch.where(eye, torch.where(left, _L_EYE, _R_EYE), labels)


def _augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    """Random flips and shifts of up to 4 px (edges repeated), the same for each image and its label map.

    ``images``: uint8 (B, H, W, 3), ``labels``: (B, H, W); both on ``gen``'s device, so nothing waits on a copy.
    """
    (b, h, w), device = labels.shape, labels.device
    flip = torch.rand(b, generator=gen, device=device) < 0.5
    shift = torch.randint(-4, 5, (2, b), generator=gen, device=device)
    rows = (torch.arange(h, device=device)[None] - shift[0][:, None]).clamp(0, h - 1)[:, :, None]
    cols = torch.arange(w, device=device)[None] - shift[1][:, None]
    cols = torch.where(flip[:, None], w - 1 - cols, cols).clamp(0, w - 1)[:, None]
    batch = torch.arange(b, device=device)[:, None, None]
    return images[batch, rows, cols], image_side_eyes(labels[batch, rows, cols])


def _preprocessor(processor, device):
    """uint8 (B, H, W, 3) -> what ``processor(images)`` gives, but on ``device`` (the processor itself works on CPU).

    The constants go to the device once: a copy per step would make every step wait for the GPU.
    """
    size = (processor.size["height"], processor.size["width"])
    mean = torch.tensor(processor.image_mean, device=device)[:, None, None]
    std = torch.tensor(processor.image_std, device=device)[:, None, None]

    def pixel_values(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)
        return (x.round().clamp(0, 255) * processor.rescale_factor - mean) / std

    return pixel_values


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the classes present in the batch, on logits upsampled to label size."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels)
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = (onehot.sum((0, 2, 3)) > 0).float()  # a weight, not a mask index, which would wait for the GPU
    dice = 1 - (2 * inter + 1) / (total + 1)
    return ce + (dice * present).sum() / present.sum()


def fit(model, processor, images: torch.Tensor, labels: torch.Tensor, augment, *, clock: TrainingClock, steps: int,
        batch_size: int, lr: float, generator: torch.Generator, device: str, desc: str):
    """The SegFormer training loop the toy world's segmenters share: AdamW on random batches of uint8 ``images``
    (N, H, W, 3) and their ``labels`` (N, H, W), ``augment(x, y, generator)`` applied, cross-entropy + Dice on the
    upsampled logits, the clock's learning rate. Returns (loss history, steps run, last loss); the model ends in
    eval mode."""
    pixel_values = _preprocessor(processor, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=device.startswith("cuda"))
    history, step, loss = [], 0, None
    bar = tqdm(total=steps, desc=desc, unit="step", mininterval=5)
    while clock.running(step):
        for group in opt.param_groups:
            group["lr"] = lr * clock.lr_factor(step)
        idx = torch.randint(0, len(images), (batch_size,), generator=generator, device=device)
        x, y = augment(images[idx], labels[idx].long(), generator)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(pixel_values=pixel_values(x)).logits
        loss = _loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 25 == 0 or step == steps:  # .item() waits for the GPU, so not every step
            history.append((step, loss.item()))
            bar.set_postfix(loss=f"{history[-1][1]:.3f}")
    bar.close()
    model.eval()
    return history, step, (loss.item() if loss is not None else None)


def train(out_dir, *, device: str = "cpu", steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
          time_budget_s: float | None = None, num_images: int = 8000, eval_images: int = 200,
          workers: int | None = None) -> dict:
    """Train the parser from scratch; write it, ``training.json``, ``loss.png`` and ``samples.png`` to ``out_dir``.

    Stops after ``steps`` or once ``time_budget_s`` seconds have passed since the call began (rendering included);
    the cosine schedule follows whichever is nearer to its end, so a time-cut run still ends at a low learning rate.
    ``eval_images`` held-out faces give the IoUs in ``training.json``, which is also what this returns.
    """
    from transformers import SegformerForSemanticSegmentation

    from .dataset import render_set

    start = time.time()
    clock = TrainingClock(steps, time_budget_s, warmup=1)  # the budget covers rendering too
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    data = render_set(num_images, seed=seed, kind="faces", face_labels=True, workers=workers)
    images = torch.from_numpy(data.images).to(device)
    labels = image_side_eyes(torch.from_numpy(data.face_labels)).to(device, torch.uint8)  # 8× less memory
    render_seconds = time.time() - start
    model = SegformerForSemanticSegmentation(make_config()).to(device).train()
    processor = make_processor()
    warmup = clock.warmup = max(1, min(200, steps // 10))
    history, step, loss = fit(model, processor, images, labels, _augment, clock=clock, steps=steps,
                              batch_size=batch_size, lr=lr, generator=gen, device=device, desc="face parser")
    train_seconds = time.time() - start - render_seconds
    iou = mean_iou(model, processor, n=eval_images, labels=DRAWN_LABELS)
    gate = float(np.mean([iou[k] for k in GATE_LABELS]))
    out_dir = Path(out_dir)
    save(model, processor, out_dir)
    record = {
        "hyperparameters": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "warmup": warmup,
                            "time_budget_s": time_budget_s, "num_images": num_images, "eval_images": eval_images,
                            "input_size": INPUT_SIZE, "device": device, "loss": "cross-entropy + soft Dice"},
        "steps_done": step, "final_loss": loss,
        "seconds": {"render": round(render_seconds, 1), "train": round(train_seconds, 1),
                    "per_step": round(train_seconds / max(step, 1), 4)},
        "held_out_iou": {k: round(v, 4) for k, v in iou.items() if k != "mean"},
        "gate": {"labels": list(GATE_LABELS), "mean_iou": round(gate, 4), "threshold": GATE, "passed": gate >= GATE},
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": _versions(),
    }
    write_json_atomic(out_dir / "training.json", record)
    save_loss_curve({"train loss": history}, out_dir / "loss.png", "toy-world face parser (SegFormer)")
    _save_samples(model, processor, out_dir / "samples.png")
    return record


def save(model, processor, out_dir: Path) -> None:
    """Weights in fp16 (small enough to ship), but ``config.json`` says float32 so a plain load gives float32."""
    fp16 = {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    model.float()  # save_pretrained writes the model's own dtype into config.json
    model.save_pretrained(out_dir, state_dict=fp16)
    processor.save_pretrained(out_dir)
    (out_dir / "model.safetensors").chmod(0o644)  # transformers 5.23 writes it 0600; shipped weights are for everyone


def _versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def load_face_parser(path=None, device: str = "cpu"):
    """``(model, processor)`` from ``path`` (default: the shipped ``weights/face-parser``), model in eval mode."""
    return load_segformer(path if path is not None else DEFAULT_PATH, CREATE_COMMAND, device)


def load_segformer(path, create_command: str, device: str = "cpu"):
    """``(model in float32 eval mode, processor)`` of a saved toy-world SegFormer; a missing one says how to make it."""
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}; create it with `{create_command}`")
    model = SegformerForSemanticSegmentation.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, SegformerImageProcessor.from_pretrained(path)


@torch.no_grad()
def parse(model, processor, images, batch_size: int = 64) -> np.ndarray:
    """Label ids (N, H, W) at the input size, for PIL images or uint8 (H, W, 3) arrays, via the processor's own path."""
    images = [np.array(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        inputs = processor(images=chunk, return_tensors="pt").to(model.device)
        outputs = model(pixel_values=inputs["pixel_values"].to(model.dtype))
        maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[im.shape[:2] for im in chunk])
        out.extend(m.cpu().numpy() for m in maps)
    return np.stack(out).astype(np.int64)


def eval_faces(n: int = 200, seed: int = 321, accessory_rate: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh faces and their (image-side eye) label maps; glasses and hats each on half, so their IoUs count."""
    rng = random.Random(seed)
    rendered = [world.render(world.sample_scene(rng, cls="face", accessory_rate=accessory_rate)) for _ in range(n)]
    truth = image_side_eyes(torch.from_numpy(np.stack([r.face_label_map() for r in rendered]))).numpy()
    return np.stack([r.image for r in rendered]), truth


def iou(pred: np.ndarray, truth: np.ndarray, labels, index: dict[str, int] = FACE_INDEX) -> dict[str, float]:
    """IoU per label over the whole set (summed intersections / summed unions: accessories occur on some faces
    only), plus their ``"mean"``; ``index``: label name -> id."""
    scores = {}
    for name in labels:
        p, t = pred == index[name], truth == index[name]
        union = (p | t).sum()
        scores[name] = float((p & t).sum() / union) if union else 1.0
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def mean_iou(model, processor, *, n: int = 200, seed: int = 321, labels=GATE_LABELS) -> dict[str, float]:
    """Per-label IoU plus their ``"mean"`` on ``n`` freshly rendered faces (``seed`` is never used for training)."""
    images, truth = eval_faces(n, seed)
    return iou(parse(model, processor, images), truth, labels)


def colourise(label_map: np.ndarray) -> np.ndarray:
    """Label ids (..., H, W) -> uint8 colours (..., H, W, 3), one fixed colour per ``FACE_LABELS`` entry."""
    return _PALETTE[label_map]


def _save_samples(model, processor, path: Path, count: int = 8) -> None:
    """Rows: input faces, ground truth, prediction. Faces with accessories first, since they are the hard part."""
    images, truth = eval_faces(2 * count, seed=654)
    accessory = np.isin(truth, [FACE_INDEX["eye_g"], FACE_INDEX["hat"]]).any((1, 2))
    pick = np.concatenate([np.nonzero(accessory)[0], np.nonzero(~accessory)[0]])[:count]
    rows = [images[pick], colourise(truth[pick]), colourise(parse(model, processor, images[pick]))]
    image_grid(np.concatenate(rows), columns=count, scale=3).save(path)
