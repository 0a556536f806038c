"""Validation = inference: the validation grid's images are what ``load_personalized`` makes from the checkpoint of
the same step with the same seed and settings, so what users see during training is what they get."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, run_training
from t2i_personal import load_personalized

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("model, method", [
    ("builtin:tiny-sd", {"name": "dreambooth", "adapter": "lora", "train_text_encoder": True}),
    ("builtin:tiny-sd", {"name": "dreambooth", "adapter": "full"}),
    ("builtin:tiny-flux", {"name": "dreambooth", "adapter": "lora"}),
])
def test_validation_grid_is_what_the_checkpoint_generates(model, method, concept_dir, tmp_path):
    prompts = ["a photo of {V} {C} on the beach", "a {V} {C} in the snow"]
    cfg = base_config(concept_dir, tmp_path / "out", model={"pretrained": model}, method=method,
                      training={"max_train_steps": 3, "checkpointing_steps": 2, "learning_rate": 1e-2},
                      validation={"prompts": prompts, "every_n_steps": 2, "num_images_per_prompt": 2,
                                  "num_inference_steps": 3, "seed": 7})
    cfg["training"]["train_batch_size"] = 1
    run_training(cfg)
    grid = np.asarray(Image.open(tmp_path / "out" / "validation" / "step-000002.png").convert("RGB"))
    pipe = load_personalized(tmp_path / "out" / "checkpoints" / "checkpoint-000002")
    pipe.set_progress_bar_config(disable=True)
    res = 32
    for i, prompt in enumerate(p.replace("{V}", "sks").replace("{C}", "dog") for p in prompts):
        for j in range(2):
            generator = torch.Generator().manual_seed(7 + i * 1000 + j)
            image = np.asarray(pipe(prompt, num_inference_steps=3, height=res, width=res, generator=generator).images[0])
            cell = grid[i * res:(i + 1) * res, j * res:(j + 1) * res]
            assert np.abs(cell.astype(int) - image.astype(int)).max() <= 1, (prompt, j)
