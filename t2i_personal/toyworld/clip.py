"""The toy world's evaluation CLIP: an open_clip model that scores how well an image matches a caption.

What: ``toy-clip`` (``configs/toy-clip.json``), a 3-layer ViT on 8×8 patches of 64×64 images and a 3-layer text
transformer over the real CLIP BPE vocabulary, both projecting into a 64-d joint space. It is trained only on
rendered world images and their captions, never on a generator's output, so CLIP scores of generated images are an
independent judge. The saved folder is plain open_clip: ``open_clip_config.json`` in the hub format
(``model_cfg`` + ``preprocess_cfg``) and ``open_clip_model.safetensors``, so
``open_clip.create_model_and_transforms('local-dir:<folder>')`` and ``open_clip.get_tokenizer('local-dir:<folder>')``
load it with no code from this package; :func:`load_toy_clip` is that call plus a clear error when weights are
missing.

How: :func:`train` renders a fixed training set (every class, faces included), and optimises the standard symmetric
InfoNCE loss (``open_clip.ClipLoss``, learnable temperature) with AdamW, linear warmup and a cosine decay, on
images shifted by a few pixels and mirrored (captions never say left or right). Captions: an in-batch negative can
carry the same words as the positive ("a dog on the grass" for two different dogs), and InfoNCE then pushes a caption
away from an image it truly describes. With one fixed caption per image such clashes would recur for the same images
every epoch; instead every image has ``CAPTIONS_PER_IMAGE`` captions (its full caption plus re-descriptions with
attributes dropped at random, tokenized once up front) and each step draws one afresh, so clashes stay occasional
noise rather than a fixed contradiction, and the model learns both the full captions it is judged on and the short
prompts generators are given.

Gate: :func:`retrieval_accuracy` — on freshly rendered images (a seed never used in training), the image's full
caption must score highest among it and 9 full captions of other random scenes for at least 80% of images
(chance: 10%).
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json_atomic
from . import world
from .reports import image_grid, save_loss_curve
from .schedule import TrainingClock

MODEL_NAME = "toy-clip"
CONFIG_PATH = Path(__file__).parent / "configs" / f"{MODEL_NAME}.json"
DEFAULT_PATH = Path(__file__).parent / "weights" / "clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CREATE_COMMAND = "python -m t2i_personal.toyworld.pretrain clip"
TRAIN_RENDER_SEED = 11  # render seed of the training images; evaluation uses other seeds
CAPTIONS_PER_IMAGE = 8
MAX_SHIFT = 4  # pixels, each way
WEIGHT_DECAY = 0.1
GATE = 0.8


def register_config() -> None:
    """Make ``toy-clip`` a model name open_clip knows (for ``create_model`` and ``get_tokenizer``)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


# ------------------------------------------------------------------------------------------------------------ data


def caption_bank(scenes: list[world.Scene], per_image: int, seed: int, tokenizer) -> torch.Tensor:
    """Token ids (N, per_image, 77): each scene's full caption, then re-descriptions with attributes dropped.

    Each distinct caption is tokenized once: the Python BPE tokenizer costs ~60 µs a caption, which at a GPU's step
    rate would cost more than the step itself, so all tokenizing happens here, before training.
    """
    rng = random.Random(seed)
    captions = [world.describe(s, full=True) if k == 0 else world.describe(s, rng)
                for s in scenes for k in range(per_image)]
    unique = sorted(set(captions))
    ids = tokenizer(unique).to(torch.int32)
    row = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([row[c] for c in captions])].view(len(scenes), per_image, -1)


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless index batches, each epoch a fresh permutation: no image appears twice in a batch (a false negative)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, H, W) shifted by up to ``MAX_SHIFT`` px (edges repeated) and mirrored at random, per image."""
    b, _, h, w = images.shape
    dev = images.device
    shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2, b, 1), generator=generator).to(dev)
    flip = (torch.rand(b, 1, generator=generator) < 0.5).to(dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = (torch.where(flip, w - 1 - cols, cols) + shift[0]).clamp(0, w - 1)
    rows = (torch.arange(h, device=dev) + shift[1]).clamp(0, h - 1)
    batch = torch.arange(b, device=dev)[:, None, None]
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _normaliser(model, device):
    """uint8 (B, 3, H, W) -> model input: the numbers open_clip's eval ``preprocess`` gives for 64×64 PIL images."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
    return lambda images: (images.float() / 255 - mean) / std


# -------------------------------------------------------------------------------------------------------- training


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    """Open_clip's trainer rule: matrices and embeddings decay; gains, biases and the temperature do not."""
    return param.ndim >= 2 and not any(key in name for key in ("ln", "bias", "logit_scale"))


def _optimizer(model, lr: float) -> torch.optim.AdamW:
    """AdamW with CLIP's betas (0.9, 0.98) and eps 1e-6."""
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if not _decays(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in params if _decays(n, p)], "weight_decay": WEIGHT_DECAY}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train(out_dir, *, device: str = "cpu", steps: int = 3000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
          time_budget_s: float | None = None, num_images: int = 30000, workers: int | None = None) -> dict:
    """Train ``toy-clip`` from scratch; write it, ``training.json``, ``loss.png`` and ``retrieval.png`` to ``out_dir``.

    Stops after ``steps`` or once ``time_budget_s`` seconds have passed since the call began (rendering and caption
    tokenizing included); the cosine schedule follows whichever is nearer to its end, so a time-cut run still ends
    at a low learning rate. The reported accuracy is that of the saved fp16 weights loaded back through open_clip.
    Returns what ``training.json`` records.
    """
    from .dataset import render_set

    start = time.time()
    clock = TrainingClock(steps, time_budget_s, warmup=1)  # the budget covers rendering too
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    register_config()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    data = render_set(num_images, seed=TRAIN_RENDER_SEED, kind="world", workers=workers)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)
    captions = caption_bank(data.scenes, CAPTIONS_PER_IMAGE, seed, tokenizer).to(device)
    prepare_seconds = time.time() - start

    model = open_clip.create_model(MODEL_NAME, device=device).train()
    normalise = _normaliser(model, device)
    loss_fn = open_clip.ClipLoss()
    opt = _optimizer(model, lr)
    warmup = clock.warmup = max(1, min(200, steps // 10))
    batches = _epoch_batches(num_images, min(batch_size, num_images), generator)
    history, step, loss_sum, final_loss = [], 0, 0.0, float("nan")
    log_every = max(1, min(50, steps // 10))
    bar = tqdm(total=steps, desc="toy clip", unit="step", mininterval=5)
    while clock.running(step):
        for group in opt.param_groups:
            group["lr"] = lr * clock.lr_factor(step)
        idx = next(batches)
        variant = torch.randint(0, CAPTIONS_PER_IMAGE, (len(idx),), generator=generator)
        x = normalise(_augment(images[idx.to(device)], generator))
        text = captions[idx.to(device), variant.to(device)].long()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            image_features, text_features, logit_scale = model(x, text)
        loss = loss_fn(image_features.float(), text_features.float(), logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the inverse temperature
        loss_sum = loss_sum + loss.detach()  # a device tensor: no GPU sync until the next log line
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == steps:
            final_loss = float(loss_sum) / (step - (history[-1][0] if history else 0))
            history.append((step, final_loss))
            loss_sum = 0.0
            bar.set_postfix(loss=f"{final_loss:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    seconds = time.time() - start

    out_dir = Path(out_dir)
    save(model, out_dir)
    loaded, preprocess, tokenizer = load_toy_clip(out_dir, device=device)
    accuracy = retrieval_accuracy(loaded, preprocess, tokenizer, device=device)
    record = {
        "model": MODEL_NAME, "model_cfg": json.loads(CONFIG_PATH.read_text()),
        "hyperparameters": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "warmup": warmup,
                            "weight_decay": WEIGHT_DECAY, "time_budget_s": time_budget_s, "num_images": num_images,
                            "train_render_seed": TRAIN_RENDER_SEED, "captions_per_image": CAPTIONS_PER_IMAGE,
                            "max_shift": MAX_SHIFT, "device": device, "loss": "open_clip.ClipLoss (symmetric InfoNCE)"},
        "steps_done": step, "seconds": round(seconds, 1), "prepare_seconds": round(prepare_seconds, 1),
        "final_loss": final_loss, "logit_scale": round(model.logit_scale.exp().item(), 2),
        "gate": {"retrieval_top1_of_10": round(accuracy, 4), "threshold": GATE, "passed": accuracy >= GATE},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (out_dir / WEIGHTS_FILE).stat().st_size,
        "versions": _versions(),
    }
    write_json_atomic(out_dir / "training.json", record)
    save_loss_curve({"train loss": history}, out_dir / "loss.png", "toy-world CLIP (symmetric InfoNCE)")
    save_retrieval_picture(loaded, preprocess, tokenizer, out_dir / "retrieval.png", device=device)
    return record


def save(model, out_dir: Path) -> None:
    """The hub-format ``open_clip_config.json`` and fp16 safetensors weights (written to a temp file, then renamed)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": json.loads(CONFIG_PATH.read_text()), "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    write_json_atomic(out_dir / CONFIG_FILE, config)
    fp16 = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(fp16, str(tmp), metadata={"format": "pt"})


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__}


# --------------------------------------------------------------------------------------------------------- loading


def load_toy_clip(path=None, device: str = "cpu"):
    """``(model, preprocess, tokenizer)`` from ``path`` (default: the shipped ``weights/clip``); float32, eval mode.

    Loads through open_clip's own ``local-dir:`` route (config and ``.safetensors`` weights read from the folder,
    nothing fetched), so the result is exactly what any open_clip user gets from that folder. ``toy-clip`` is also
    registered, so ``create_model_and_transforms('toy-clip', pretrained=<folder>/open_clip_model.safetensors)`` works
    too (open_clip 3.3 reads ``.safetensors`` checkpoints itself).
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no toy CLIP at {path} (missing {', '.join(missing)}); create it with `{CREATE_COMMAND}`")
    register_config()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.float().eval(), preprocess, tokenizer


# ------------------------------------------------------------------------------------------------------ evaluation


def _candidate_captions(scenes: list[world.Scene], distractors: int, rng: random.Random) -> list[list[str]]:
    """Per scene: its full caption first, then ``distractors`` distinct full captions of other random scenes."""
    out = []
    for s in scenes:
        options = [world.describe(s, full=True)]
        while len(options) < 1 + distractors:
            caption = world.describe(world.sample_scene(rng), full=True)
            if caption not in options:
                options.append(caption)
        out.append(options)
    return out


@torch.no_grad()
def caption_scores(model, preprocess, tokenizer, images: np.ndarray, candidates: list[list[str]],
                   device: str = "cpu") -> torch.Tensor:
    """Cosine similarity (N, K) of each uint8 (H, W, 3) image with its own K candidate captions, via ``preprocess``."""
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images]).to(device)
    image_features = model.encode_image(pixels, normalize=True)
    k = len(candidates[0])
    text = tokenizer([c for options in candidates for c in options]).to(device)
    text_features = model.encode_text(text, normalize=True).view(len(candidates), k, -1)
    return torch.einsum("nd,nkd->nk", image_features, text_features).float().cpu()


def _retrieval_trial(model, preprocess, tokenizer, n: int, distractors: int, seed: int, device: str):
    from .dataset import render_set

    data = render_set(n, seed=seed, kind="world", workers=1)
    candidates = _candidate_captions(data.scenes, distractors, random.Random(seed))
    return data.images, candidates, caption_scores(model, preprocess, tokenizer, data.images, candidates, device)


def retrieval_accuracy(model, preprocess, tokenizer, *, n: int = 200, distractors: int = 9, seed: int = 123,
                       device: str = "cpu") -> float:
    """Fraction of ``n`` fresh world images whose full caption outscores ``distractors`` captions of other scenes."""
    _, _, scores = _retrieval_trial(model, preprocess, tokenizer, n, distractors, seed, device)
    return (scores.argmax(dim=1) == 0).float().mean().item()


def save_retrieval_picture(model, preprocess, tokenizer, path: Path, *, count: int = 8, seed: int = 123,
                           device: str = "cpu") -> Path:
    """Fresh images beside the caption the model picks among 10 (green: the true one; red: wrong, true one below)."""
    images, candidates, scores = _retrieval_trial(model, preprocess, tokenizer, count, 9, seed, device)
    row_height, text_x = 136, 140
    canvas = Image.new("RGB", (720, row_height * count), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, options) in enumerate(zip(images, candidates)):
        top = int(scores[i].argmax())
        y = i * row_height
        canvas.paste(image_grid(image[None], columns=1, scale=2), (4, y + 4))
        draw.text((text_x, y + 40), options[top], fill=(0, 140, 0) if top == 0 else (200, 0, 0))
        if top != 0:
            draw.text((text_x, y + 60), f"true: {options[0]}", fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
