"""Metric throughput: CLIP-T + CLIP-I + DINO-I batched (batch 32) vs a per-image loop (batch 1).

Both paths run the same tiny encoders built here with random weights (the toy CLIP architecture through open_clip,
64 px, and a 2-layer ViT through transformers, 64 px crop), on the same 64 random images, prompts and 4 reference
images, and the scores are checked to agree. Reference embeddings are cached per concept in both paths (that is
the metrics' behaviour), so the difference is the batching of the generated images and prompts.

    python benchmarks/metrics_throughput.py [--images 64] [--batch 32] [--repeats 3] [--threads 1] \\
        [--clip-arch tiny|toy-clip]

Prints images/s of each path (best of ``--repeats``) and the ratio (target: >= 4x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: ``tiny``: a 2-layer, width-64 CLIP (the default); ``toy-clip``: the toy world's evaluation CLIP architecture
#: (3 layers, width 128), whose per-image compute is large enough on one CPU thread to cap the gain of batching.
CLIP_ARCHS = {
    "tiny": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "head_width": 32,
                                             "layers": 2},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
}


def build_encoders(arch: str = "tiny"):
    import open_clip
    import torch
    from transformers import ViTConfig, ViTModel

    from t2i_personal.metrics import MetricModel
    from t2i_personal.toyworld import clip as toy_clip

    torch.manual_seed(0)
    if arch == "toy-clip":
        toy_clip.register_config()
        model, _, preprocess = open_clip.create_model_and_transforms(toy_clip.MODEL_NAME)
        tokenizer = open_clip.get_tokenizer(toy_clip.MODEL_NAME)
    else:
        cfg = CLIP_ARCHS[arch]
        model = open_clip.CLIP(**cfg)
        preprocess = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    clip = MetricModel("open_clip", model.float().eval(), preprocess, tokenizer, source=f"random {arch}",
                       backbone=arch, pretrained=None)
    vit = ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128), add_pooling_layer=False).float().eval()
    dino = MetricModel("transformers", vit, None, None, source="random tiny ViT", backbone="tiny-vit", pretrained=None)
    return clip, dino


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip-arch", default="tiny", choices=["tiny", "toy-clip"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from t2i_personal.metrics import ClipImageScore, ClipTextScore, DinoImageScore

    torch.set_num_threads(args.threads)
    clip, dino = build_encoders(args.clip_arch)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    refs = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    scenes = ["in the jungle", "on the beach", "in the snow", "on a cobblestone street"]
    texts = [f"a dog {scenes[i % 4]}" for i in range(args.images)]

    def metrics(batch):
        return (ClipTextScore(clip, batch_size=batch, progress=False),
                ClipImageScore(clip, batch_size=batch, progress=False),
                DinoImageScore(dino, resize=64, crop=64, batch_size=batch, progress=False))

    def batched():
        t, i, d = metrics(args.batch)
        return torch.stack([t(images, texts), i(images, references=refs), d(images, references=refs)])

    def per_image():
        t, i, d = metrics(1)
        out = [torch.cat([t([im], [tx]), i([im], references=refs), d([im], references=refs)])
               for im, tx in zip(images, texts)]
        return torch.stack(out, dim=1)

    def timed(fn):
        best, result = float("inf"), None
        fn()  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - start)
        return args.images / best, result

    fast, a = timed(batched)
    slow, b = timed(per_image)
    max_diff = float((a - b).abs().max())
    print(f"{args.images} images, 64 px, CLIP-T + CLIP-I + DINO-I, {torch.get_num_threads()} thread(s), "
          f"best of {args.repeats}, CLIP {args.clip_arch}")
    print(f"batched (batch {args.batch}): {fast:8.1f} images/s")
    print(f"per-image loop (batch 1):  {slow:8.1f} images/s")
    print(f"ratio: {fast / slow:.2f}x (target >= 4x); max |score difference| {max_diff:.2e}")
    return 0 if max_diff < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
