"""data.caption_dropout: an instance image with a caption file trains with the bare instance prompt part of the
time, drawn per (seed, epoch, index) like every other choice."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import base_config, run_training
from t2i_personal.data.concepts import ConceptDataset, Example
from t2i_personal.data.transforms import ImageTransform


def dataset(caption_dropout: float, seed: int = 0) -> ConceptDataset:
    image = Image.new("RGB", (40, 40), "red")
    instances = [Example(image, None, "a photo of sks dog on a red sofa", 0, False, "a photo of sks dog"),
                 Example(image, None, "a photo of sks dog", 0, False, None)]
    prompts = ["a photo of sks dog", "a photo of sks dog on a red sofa"]
    return ConceptDataset(instances, None, ImageTransform(32, True, True), {p: i for i, p in enumerate(prompts)}, seed,
                          caption_dropout=caption_dropout)


def prompts_drawn(ds: ConceptDataset, index: int, epochs: int = 200) -> list[int]:
    return [ds[(index, epoch)][0]["prompt"] for epoch in range(epochs)]


def test_captioned_images_use_the_bare_prompt_at_the_asked_rate():
    drawn = prompts_drawn(dataset(0.3), 0)
    bare = drawn.count(0) / len(drawn)
    assert 0.2 < bare < 0.4
    assert prompts_drawn(dataset(0.3), 0) == drawn  # seeded
    assert set(prompts_drawn(dataset(0.0), 0)) == {1}  # off: always the caption
    assert set(prompts_drawn(dataset(1.0), 0)) == {0}
    assert set(prompts_drawn(dataset(0.5), 1)) == {0}  # no caption file: the instance prompt anyway


def test_training_with_caption_files_and_dropout(concept_dir, tmp_path):
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i, path in enumerate(sorted(p for p in concept_dir.iterdir() if p.suffix == ".png")):
        (folder / path.name).write_bytes(path.read_bytes())
        (folder / path.with_suffix(".txt").name).write_text(f"a photo of {{V}} {{C}} number {i}")
    cfg = base_config(folder, tmp_path / "out", data={"caption_dropout": 0.5})
    trainer = run_training(cfg)
    assert "a photo of sks dog" in trainer.run.dataset.prompt_index
    assert "a photo of sks dog number 0" in trainer.run.dataset.prompt_index
