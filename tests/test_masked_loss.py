"""data.masks: per-image subject masks (``img.mask.png`` or the alpha channel) weight the instance loss, through
the same resize, crop and flip as their image; prior samples are never masked; bad masks get clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_config, run_training
from t2i_personal.data.concepts import load_instance_examples
from t2i_personal.data.transforms import ImageTransform
from t2i_personal.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def half_mask(width=64, height=48) -> Image.Image:
    """White (subject) on the left half."""
    arr = np.zeros((height, width), dtype=np.uint8)
    arr[:, : width // 2] = 255
    return Image.fromarray(arr, mode="L")


def test_mask_follows_its_image_and_weights_the_background():
    transform = ImageTransform(32, center_crop=True, random_flip=True, vae_scale_factor=4)
    image = Image.new("RGB", (64, 48), "red")
    for seed in range(8):
        plan = transform(image, random.Random(seed))
        weights = transform.subject_mask(half_mask(), plan, background_weight=0.25)
        assert weights.shape == (1, 8, 8)
        left, right = weights[0, :, :2].mean().item(), weights[0, :, -2:].mean().item()
        subject, background = (right, left) if plan.flipped else (left, right)
        assert subject == pytest.approx(1.0) and background == pytest.approx(0.25)


def write_folder(root, kind: str):
    root.mkdir()
    for i in range(2):
        arr = np.full((40, 40, 4), 120, dtype=np.uint8)
        arr[..., 3] = 0
        arr[:, :20, 3] = 255
        if kind == "alpha":
            Image.fromarray(arr, mode="RGBA").save(root / f"dog{i}.png")
        else:
            Image.fromarray(arr[..., :3]).save(root / f"dog{i}.png")
            if kind == "files":
                Image.fromarray(arr[..., 3]).save(root / f"dog{i}.mask.png")
    return root


class Concept:
    def __init__(self, folder):
        self.instance_dirs, self.identifier, self.class_noun = [folder], "sks", "dog"
        self.instance_prompt = "a photo of {V} {C}"


@pytest.mark.parametrize("kind", ["files", "alpha"])
def test_masks_load_from_files_or_alpha(kind, tmp_path):
    examples = load_instance_examples([Concept(write_folder(tmp_path / "dogs", kind))], 10**7, masks=kind)
    assert len(examples) == 2  # the mask files are not instance images
    mask = np.asarray(examples[0].subject_mask)
    assert mask[:, :20].min() == 255 and mask[:, 20:].max() == 0


def test_bad_masks_are_named(tmp_path):
    folder = write_folder(tmp_path / "plain", "none")
    with pytest.raises(ConfigError, match=r"dog0.png has no mask dog0.mask.png"):
        load_instance_examples([Concept(folder)], 10**7, masks="files")
    with pytest.raises(ConfigError, match=r"dog0.png has no alpha channel"):
        load_instance_examples([Concept(folder)], 10**7, masks="alpha")
    Image.new("L", (10, 10), 255).save(folder / "dog0.mask.png")
    Image.new("L", (40, 40), 255).save(folder / "dog1.mask.png")
    with pytest.raises(ConfigError, match=r"mask of .*dog0.png is 10x10 but the image is 40x40"):
        load_instance_examples([Concept(folder)], 10**7, masks="files")


def masked_run(concept_dir, out, value: int | None, **data):
    folder = out.parent / f"{out.name}-images"
    folder.mkdir()
    for path in sorted(p for p in concept_dir.iterdir() if p.suffix == ".png"):
        (folder / path.name).write_bytes(path.read_bytes())
        if value is not None:
            Image.new("L", Image.open(path).size, value).save(folder / path.with_suffix(".mask.png").name)
    cfg = base_config(folder, out, method={"name": "dreambooth", "adapter": "lora"},
                      data={"masks": "files" if value is not None else "none", **data})
    run_training(cfg)
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def test_an_all_subject_mask_is_no_mask_and_an_empty_one_trains_nothing(concept_dir, tmp_path):
    plain = masked_run(concept_dir, tmp_path / "plain", None)
    whole = masked_run(concept_dir, tmp_path / "whole", 255)
    assert plain.keys() == whole.keys() and all(torch.allclose(plain[k], whole[k], atol=1e-7) for k in plain)
    sheet = Image.open(tmp_path / "whole" / "validation" / "masks.png")  # each image beside its mask, once
    assert sheet.size == (2 * 32, 3 * 32)
    empty = masked_run(concept_dir, tmp_path / "empty", 0)
    ups = [v for k, v in empty.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(not v.any() for v in ups)  # zero loss everywhere: LoRA's B stays at its zero init
    weighted = masked_run(concept_dir, tmp_path / "weighted", 0, mask_background_weight=1.0)
    assert all(torch.allclose(plain[k], weighted[k], atol=1e-7) for k in plain)  # background weight 1 = no mask


def test_masks_and_rescale_augmentation_are_refused(concept_dir, tmp_path):
    from t2i_personal.config import TrainConfig

    cfg = base_config(concept_dir, tmp_path / "out", data={"masks": "files", "rescale_augmentation": True})
    with pytest.raises(ValueError, match="data.masks cannot be combined"):
        TrainConfig.model_validate(cfg)
