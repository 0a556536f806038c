"""Custom Diffusion's random-rescale augmentation (data.rescale_augmentation): transform, masked loss, training."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, run_training
from t2i_personal.config import TrainConfig
from t2i_personal.data.concepts import ConceptDataset, Example, collate, rescale_prompt_variants
from t2i_personal.data.transforms import (RESCALE_CANVAS_VALUE, RESCALE_LARGE_PREFIXES, RESCALE_PREFIXES,
                                          RESCALE_SMALL_PREFIXES, ImageTransform)
from t2i_personal.methods import weighted_mse

RES, F = 32, 4  # builtin:tiny-sd: 32 px -> 8x8 latents


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 60, np.float32)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _expected_mask(top: int, left: int, side: int) -> torch.Tensor:
    """The official margin: latent cells top//f+1 .. (top+side)//f-1 (exclusive) in each direction."""
    mask = torch.zeros(1, RES // F, RES // F)
    mask[0, top // F + 1: (top + side) // F - 1, left // F + 1: (left + side) // F - 1] = 1.0
    return mask


def test_rescale_geometry_mask_canvas_and_prefixes():
    white = Image.new("RGB", (48, 40), (255, 255, 255))  # pixels 1.0, the canvas RESCALE_CANVAS_VALUE
    t = ImageTransform(RES, center_crop=False, random_flip=True, rescale=True, vae_scale_factor=F)
    small_sides, large_sides, prefixes = set(), set(), {"small": set(), "large": set()}
    for seed in range(150):
        out = t(white, random.Random(seed))
        side, (top, left) = out.rescale_size, out.rescale_offset
        assert out.pixels.shape == (3, RES, RES) and out.mask.shape == (1, RES // F, RES // F)
        assert out.mask.dtype == torch.float32
        if side <= RES:
            small_sides.add(side)
            assert RES // 3 <= side <= RES
            assert 0 <= top <= RES - side and 0 <= left <= RES - side
            inside = torch.zeros(RES, RES, dtype=torch.bool)
            inside[top: top + side, left: left + side] = True
            assert torch.all(out.pixels[:, inside] == 1.0)
            assert torch.all(out.pixels[:, ~inside] == RESCALE_CANVAS_VALUE)
            assert torch.equal(out.mask, _expected_mask(top, left, side))
            # every masked latent cell lies wholly inside the pasted image, a latent pixel away from its far edges
            for r, c in out.mask[0].nonzero().tolist():
                assert inside[r * F: (r + 1) * F, c * F: (c + 1) * F].all()
                assert (r + 1) * F < top + side and (c + 1) * F < left + side
        else:
            large_sides.add(side)
            assert int(1.2 * RES) <= side < int(1.4 * RES)
            assert 0 <= top <= side - RES and 0 <= left <= side - RES
            assert torch.all(out.mask == 1.0) and torch.all(out.pixels == 1.0)
        if side < 0.6 * RES:
            assert out.prompt_prefix in RESCALE_SMALL_PREFIXES
            prefixes["small"].add(out.prompt_prefix)
        elif side > RES:
            assert out.prompt_prefix in RESCALE_LARGE_PREFIXES
            prefixes["large"].add(out.prompt_prefix)
        else:
            assert out.prompt_prefix is None
    assert small_sides and large_sides
    assert prefixes == {"small": set(RESCALE_SMALL_PREFIXES), "large": set(RESCALE_LARGE_PREFIXES)}


def test_rescale_branch_frequency_and_full_scale_ranges():
    t = ImageTransform(RES, rescale=True, vae_scale_factor=F)
    rng = random.Random(0)
    plans = [t.plan((40, 40), rng) for _ in range(4000)]  # plan draws exactly as __call__
    sides = [p.rescale_size for p in plans]
    small = [s for s in sides if s <= RES]
    assert abs(len(small) / len(sides) - 0.66) < 0.03
    assert set(small) == set(range(RES // 3, RES + 1))  # np.random.randint(size // 3, size + 1)
    assert {s for s in sides if s > RES} == set(range(int(1.2 * RES), int(1.4 * RES)))  # randint(1.2 s, 1.4 s)
    counts = {p: sum(pl.prompt_prefix == p for pl in plans) for p in RESCALE_PREFIXES}
    assert all(n > 100 for n in counts.values()), counts


def test_plan_matches_call_and_is_deterministic_with_the_given_rng_only():
    img = _gradient(60, 45)
    t = ImageTransform(RES, center_crop=False, random_flip=True, rescale=True, vae_scale_factor=F)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    for seed in range(20):
        a, b = t(img, random.Random(seed)), t(img, random.Random(seed))
        plan = t.plan(img.size, random.Random(seed))
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.mask, b.mask)
        for x in (b, plan):
            assert (a.rescale_size, a.rescale_offset, a.crop_top_left, a.flipped, a.prompt_prefix) == (
                x.rescale_size, x.rescale_offset, x.crop_top_left, x.flipped, x.prompt_prefix)
        assert torch.equal(a.mask, plan.mask)
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    outs = [t(img, random.Random(s)) for s in range(8)]
    assert len({(o.rescale_size, o.rescale_offset) for o in outs}) > 1, "seed must matter"


def test_flip_moves_the_content_not_the_mask():
    img = _gradient(50, 50)
    plain = ImageTransform(RES, rescale=True, vae_scale_factor=F)
    flip = ImageTransform(RES, random_flip=True, rescale=True, vae_scale_factor=F)
    flipped_seen = 0
    for seed in range(30):
        a, b = plain(img, random.Random(seed)), flip(img, random.Random(seed))
        assert (a.rescale_size, a.rescale_offset) == (b.rescale_size, b.rescale_offset)  # same draws up to the flip
        assert torch.equal(a.mask, b.mask)
        if not b.flipped:
            assert torch.equal(a.pixels, b.pixels)
            continue
        flipped_seen += 1
        side, (top, left) = a.rescale_size, a.rescale_offset
        if side > RES:
            assert torch.equal(b.pixels, a.pixels.flip(-1))
        else:
            region = (slice(None), slice(top, top + side), slice(left, left + side))
            assert torch.equal(b.pixels[region], a.pixels[region].flip(-1))
            outside = torch.ones(RES, RES, dtype=torch.bool)
            outside[top: top + side, left: left + side] = False
            assert torch.all(b.pixels[:, outside] == RESCALE_CANVAS_VALUE)
    assert flipped_seen


def test_off_is_unchanged():
    img = _gradient(70, 50)
    for kwargs in ({}, {"center_crop": False, "random_flip": True}):
        old, new = ImageTransform(48, **kwargs), ImageTransform(48, **kwargs, rescale=False, vae_scale_factor=8)
        for seed in range(5):
            a, b = old(img, random.Random(seed)), new(img, random.Random(seed))
            assert torch.equal(a.pixels, b.pixels)
            assert (a.original_size, a.crop_top_left, a.flipped, a.resized_size) == (
                b.original_size, b.crop_top_left, b.flipped, b.resized_size)
            assert b.mask is None and b.prompt_prefix is None and b.rescale_size is None
    with pytest.raises(ValueError, match="vae_scale_factor"):
        ImageTransform(RES, rescale=True)
    with pytest.raises(ValueError, match="multiple"):
        ImageTransform(36, rescale=True, vae_scale_factor=8)


def test_dataset_rescales_instances_only_and_collates_masks():
    img = _gradient(40, 40)
    instances = [Example(img, Path(f"i{k}.png"), "a photo of sks dog", 0, False) for k in range(2)]
    priors = [[Example(img, Path("c.png"), "a photo of dog", 0, True)]]
    prompts = sorted({"a photo of sks dog", "a photo of dog", *rescale_prompt_variants(["a photo of sks dog"])})
    index = {p: i for i, p in enumerate(prompts)}
    t = ImageTransform(RES, rescale=True, vae_scale_factor=F)
    ds = ConceptDataset(instances, priors, t, index, seed=0)
    seen_prefixes = set()
    for item in range(len(ds)):
        for epoch in range(6):
            inst, prior = ds[(item, epoch)]
            assert inst["mask"].shape == (1, RES // F, RES // F)
            seen_prefixes.add(prompts[inst["prompt"]].removesuffix("a photo of sks dog"))
            assert prompts[prior["prompt"]] == "a photo of dog"
            assert torch.all(prior["mask"] == 1.0)
            plain = t.without_rescale()(img, random.Random(0)).pixels  # center crop: rng-free
            assert torch.equal(prior["pixels"], plain)
            again = ds[(item, epoch)][0]
            assert torch.equal(again["pixels"], inst["pixels"]) and again["prompt"] == inst["prompt"]
    assert seen_prefixes - {""} and "" in seen_prefixes
    batch = collate([ds[(0, 0)], ds[(1, 0)]])
    assert batch["mask"].shape == (4, 1, RES // F, RES // F)
    assert torch.all(batch["mask"][2:] == 1.0)  # priors come last
    off = ConceptDataset(instances, priors, ImageTransform(RES), index, seed=0)
    assert collate([off[(0, 0)]])["mask"] is None


def test_masked_mse_ignores_errors_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    weights = torch.tensor([1.0, 0.5, 2.0])
    mask = torch.zeros(3, 1, 8, 8)
    mask[0, :, 2:6, 1:5] = 1
    mask[1, :, 3:7, 3:7] = 1
    mask[2] = 1
    loss = weighted_mse(pred, target, weights, mask)
    changed = pred + 10 * (1 - mask)  # only outside the mask
    assert torch.equal(weighted_mse(changed, target, weights, mask), loss)
    assert not torch.equal(weighted_mse(changed, target, weights), weighted_mse(pred, target, weights))
    assert torch.equal(weighted_mse(pred, target, weights, mask[:, 0]), loss)  # [B, h, w] works the same
    # per-sample mean over the masked elements, then the per-sample weights
    err = (pred - target) ** 2
    expected = torch.stack([err[i][:, mask[i, 0].bool()].mean() for i in range(3)])
    torch.testing.assert_close(loss, (expected * weights).mean())
    ones = torch.ones(3, 1, 8, 8)
    torch.testing.assert_close(weighted_mse(pred, target, weights, ones), weighted_mse(pred, target, weights),
                               rtol=1e-6, atol=0)
    # an empty mask (possible at tiny resolutions) contributes 0, not NaN
    empty = mask.clone()
    empty[0] = 0
    value = weighted_mse(pred, target, weights, empty)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, (expected * weights * torch.tensor([0.0, 1.0, 1.0])).mean())


def test_config_rejects_rescale_with_cached_latents(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", training={"cache_latents": True})
    cfg["data"]["rescale_augmentation"] = True
    with pytest.raises(ValueError, match="rescale_augmentation"):
        TrainConfig.model_validate(cfg)
    cfg["training"]["cache_latents"] = False
    assert TrainConfig.model_validate(cfg).data.rescale_augmentation is True
    assert TrainConfig.model_validate(base_config(concept_dir, tmp_path / "o")).data.rescale_augmentation is False


def _trainable(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.method.trainable_state_dict(trainer.components).items()}


@pytest.mark.parametrize("name", ["dreambooth", "custom_diffusion"])
def test_training_with_rescale_trains_and_resumes_bit_exactly(name, concept_dir, tmp_path, monkeypatch):
    def config(out, **training):
        if name == "dreambooth":
            method = {"name": "dreambooth", "adapter": "lora", "prior": "class_images"}
            cfg = base_config(concept_dir, out, method=method)
        else:
            cfg = base_config(concept_dir, out, method={"name": "custom_diffusion", "prior": "class_images"})
            cfg["concepts"] = [{"identifier": "<new1>", "initializer_token": "dog", "class_noun": "dog",
                                "instance_dir": str(concept_dir), "num_class_images": 2}]
        cfg["data"].update(rescale_augmentation=True, random_flip=True, center_crop=False)
        cfg["training"].update(max_train_steps=4, checkpointing_steps=2, snr_gamma=5.0, **training)
        return cfg

    from t2i_personal.methods.base import Method

    masks, loss_terms = [], Method.loss_terms

    def recording(self, step, components):
        masks.append((step.loss_mask.detach().cpu().clone(), step.is_prior.cpu().clone()))
        return loss_terms(self, step, components)

    monkeypatch.setattr(Method, "loss_terms", recording)
    straight = run_training(config(tmp_path / "straight"))
    monkeypatch.setattr(Method, "loss_terms", loss_terms)
    assert len(masks) == 4
    for mask, is_prior in masks:  # the trainer hands the collated masks to the method: priors all ones
        assert mask.shape == (4, 1, RES // F, RES // F) and is_prior.tolist() == [False, False, True, True]
        assert torch.all(mask[is_prior] == 1.0)
    assert any(not torch.all(mask[~is_prior] == 1.0) for mask, is_prior in masks), "some instance was pasted small"
    assert all(np.isfinite(v) for v in straight.last_logs.values()), straight.last_logs
    assert {"denoise", "prior"} <= set(straight.last_logs)
    instance_prompts = {p for p in straight.run.dataset.prompt_index if "dog" in p and ("sks" in p or "<new1>" in p)}
    assert len(instance_prompts) == 5  # the prompt and its 4 prefixed variants, all tokenized up front
    assert len(straight.run.prompt_ids[0]) == len(straight.run.dataset.prompt_index)

    cfg = config(tmp_path / "resumed", stop_after_step=2)
    run_training(cfg)
    assert not (tmp_path / "resumed" / "personalization.json").exists()
    cfg["training"].update(stop_after_step=None, resume="latest")
    resumed = run_training(cfg)
    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:3]}"
    assert (tmp_path / "resumed" / "personalization.json").exists()
