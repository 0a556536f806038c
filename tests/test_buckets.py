"""data.buckets: images keep their shape (the nearest of a set of sizes with about resolution² pixels), a micro-batch
holds one bucket, SDXL's time ids get the true original size, crop and target, and resume stays bit-exact."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import assert_resume_is_exact, base_config, run_training
from t2i_personal.data.buckets import BucketBatchSampler, bucket_sizes, nearest_bucket

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_buckets_keep_the_pixel_count_and_the_aspect_range():
    buckets = bucket_sizes(512, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 0.5 <= w / h <= 2 for w, h in buckets)
    portrait = nearest_bucket((600, 900), buckets)
    assert portrait[0] < portrait[1] and abs(portrait[0] / portrait[1] - 600 / 900) < 0.1
    assert nearest_bucket((900, 600), buckets)[0] > 512
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)


def test_batches_hold_one_bucket_and_ranks_split_the_stream():
    sizes = [(32, 32)] * 5 + [(24, 40)] * 3 + [(40, 24)] * 4
    single = BucketBatchSampler(sizes, 2, seed=3)
    batches = [single.batch(m) for m in range(40)]
    assert all(len({sizes[i] for i, _ in b}) == 1 for b in batches)
    assert batches == [BucketBatchSampler(sizes, 2, seed=3).batch(m) for m in range(40)]  # a function of seed, step
    ranks = [BucketBatchSampler(sizes, 2, seed=3, num_processes=2, rank=r) for r in (0, 1)]
    assert [ranks[m % 2].batch(m // 2) for m in range(40)] == batches
    assert BucketBatchSampler(sizes, 2, seed=3, start=7).batch(7) == batches[7]


@pytest.fixture
def mixed_folder(concept_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    sources = sorted(p for p in concept_dir.iterdir() if p.suffix == ".png")
    for path, size in zip(sources, [(36, 60), (60, 36), (48, 48)]):  # portrait, landscape, square
        Image.open(path).convert("RGB").resize(size).save(folder / path.name)
    return folder


def test_sdxl_trains_on_buckets_with_true_sizes(mixed_folder, tmp_path, monkeypatch):
    from t2i_personal.families.sdxl import StableDiffusionXL

    seen = []
    real = StableDiffusionXL.add_image_conditioning

    def record(self, cond, original_sizes, crops_top_left, target_size):
        seen.append((list(original_sizes), target_size))
        return real(self, cond, original_sizes, crops_top_left, target_size)

    monkeypatch.setattr(StableDiffusionXL, "add_image_conditioning", record)
    cfg = base_config(mixed_folder, tmp_path / "out", model={"pretrained": "builtin:tiny-sdxl"},
                      method={"name": "dreambooth", "adapter": "lora"}, data={"buckets": True, "bucket_step": 8},
                      training={"max_train_steps": 6, "train_batch_size": 1})
    trainer = run_training(cfg)
    targets = {target for _, target in seen}
    assert len(targets) >= 2 and any(h != w for h, w in targets)  # not only squares
    assert {tuple(o) for originals, _ in seen for o in originals} <= {(60, 36), (36, 60), (48, 48)}
    sizes = set(trainer.run.dataset.sizes)
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)


@pytest.mark.parametrize("cache", [False, True])
def test_resume_with_buckets_is_bit_exact(cache, mixed_folder, tmp_path):
    def config(out, **training):
        return base_config(mixed_folder, out, method={"name": "dreambooth", "adapter": "lora", "prior": "class_images"},
                           data={"buckets": True, "bucket_step": 8},
                           training={"max_train_steps": 4, "checkpointing_steps": 2, "train_batch_size": 1,
                                     "cache_latents": cache, **training})

    assert_resume_is_exact(config, tmp_path)


def test_buckets_on_flux(mixed_folder, tmp_path):
    cfg = base_config(mixed_folder, tmp_path / "out", model={"pretrained": "builtin:tiny-flux"},
                      method={"name": "dreambooth", "adapter": "lora"}, data={"buckets": True, "bucket_step": 8},
                      training={"max_train_steps": 3, "train_batch_size": 1})
    trainer = run_training(cfg)
    assert len(set(trainer.run.dataset.sizes)) == 3


def test_bucket_options_contradictions(concept_dir, tmp_path):
    from t2i_personal.config import TrainConfig

    with pytest.raises(ValueError, match="data.buckets cannot be combined"):
        TrainConfig.model_validate(base_config(concept_dir, tmp_path / "o", data={"buckets": True,
                                                                                 "rescale_augmentation": True}))
    with pytest.raises(ValueError, match="bucket_step is set but data.buckets is false"):
        TrainConfig.model_validate(base_config(concept_dir, tmp_path / "o", data={"bucket_step": 64}))
