"""``python -m t2i_personal.mask``: subject masks from a text-prompted segmentation model (CLIPSeg through
transformers; a tiny random one here, saved and loaded as a user's would be), written as ``img.mask.png`` that
``data.masks: files`` then trains with."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import base_config, run_training
from t2i_personal import mask


@pytest.fixture(scope="module")
def tiny_clipseg(tmp_path_factory):
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from t2i_personal.models.tokenizer import build_clip_tokenizer

    config = CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32, reduce_dim=16, extract_layers=[1, 2], decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clipseg")
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}),
                     tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return str(folder)


def copy_images(concept_dir, folder):
    folder.mkdir()
    for path in sorted(p for p in concept_dir.iterdir() if p.suffix == ".png"):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.mark.parametrize("soft", [False, True])
def test_masks_are_written_beside_the_images_and_train(soft, tiny_clipseg, concept_dir, tmp_path, capsys):
    folder = copy_images(concept_dir, tmp_path / "photos")
    args = [str(folder), "--class-noun", "dog", "--model", tiny_clipseg] + (["--soft"] if soft else [])
    assert mask.main(args) == 0
    assert "wrote 3 masks" in capsys.readouterr().out
    for image_path in sorted(folder.glob("*.png")):
        if image_path.name.endswith(".mask.png"):
            continue
        written = np.asarray(Image.open(image_path.with_name(image_path.stem + ".mask.png")))
        assert written.shape == Image.open(image_path).size[::-1]
        values = set(np.unique(written).tolist())
        assert values <= {0, 255} if not soft else len(values) > 2
    run_training(base_config(folder, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora"},
                             data={"masks": "files", "mask_background_weight": 0.1}))
    assert (tmp_path / "out" / "validation" / "masks.png").is_file()


def test_existing_masks_are_kept_and_missing_models_named(tiny_clipseg, concept_dir, tmp_path, capsys):
    folder = copy_images(concept_dir, tmp_path / "photos")
    first = sorted(folder.glob("*.png"))[0]
    Image.new("L", Image.open(first).size, 255).save(first.with_name(first.stem + ".mask.png"))
    assert mask.main([str(folder), "--class-noun", "dog", "--model", tiny_clipseg]) == 0
    assert np.asarray(Image.open(first.with_name(first.stem + ".mask.png"))).min() == 255  # kept
    assert mask.main([str(folder), "--class-noun", "dog", "--model", "nobody/no-such-segmenter"]) == 2
    assert "segmentation model" in capsys.readouterr().err
