"""The toy world's face parser: its training labels, its saved format (plain transformers must load it) and ``parse``.

Accuracy of the shipped weights is gated elsewhere; these tests only need a few training steps.
"""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_personal.toyworld import face_parser, world


def _rows(label_map, name):
    return np.nonzero(label_map == world.FACE_LABELS.index(name))[0]


def _mean_x(label_map, name):
    return np.nonzero(label_map == world.FACE_LABELS.index(name))[1].mean()


@pytest.fixture(scope="module")
def face():
    return world.sample_scene(random.Random(0), cls="face", glasses=True, hat="red", hair_length="long", flip=False)


def test_glasses_and_hat_are_labelled_where_they_are_drawn(face):
    labels = world.render(face).face_label_map()
    bare = world.render(replace(face, glasses=False, hat=None)).face_label_map()
    eye_rows = np.concatenate([_rows(bare, "l_eye"), _rows(bare, "r_eye")])
    glasses, hat, skin = _rows(labels, "eye_g"), _rows(labels, "hat"), _rows(labels, "skin")
    assert glasses.min() <= eye_rows.min() and glasses.max() >= eye_rows.max()  # the lenses cover the eyes
    assert not np.isin(labels, [face_parser.FACE_INDEX["l_eye"], face_parser.FACE_INDEX["r_eye"]]).any()
    assert hat.max() < eye_rows.min() and hat.min() < skin.min()  # the hat sits above the face
    assert len(_rows(labels, "hair")) > 50 and len(glasses) > 20 and len(hat) > 50
    assert set(np.unique(labels)) <= {world.FACE_LABELS.index(n) for n in face_parser.DRAWN_LABELS}


@pytest.mark.parametrize("cls", [c for c in world.CLASSES if c != "face"])
def test_other_classes_are_all_background(cls):
    scene = world.sample_scene(random.Random(1), cls=cls, glasses=cls in world.ANIMATE, hat="red")
    assert not world.render(scene).face_label_map().any()


@pytest.mark.parametrize("flip", [False, True])
def test_world_eye_labels_follow_image_side(face, flip):
    labels = world.render(replace(face, glasses=False, flip=flip)).face_label_map()
    assert _mean_x(labels, "l_eye") < _mean_x(labels, "r_eye")


@pytest.mark.parametrize("flip", [False, True])
def test_image_side_eyes_puts_l_eye_left(face, flip):
    raw = torch.from_numpy(world.render(replace(face, glasses=False, flip=flip)).face_label_map())
    fixed = face_parser.image_side_eyes(raw[None])[0]
    assert _mean_x(fixed.numpy(), "l_eye") < _mean_x(fixed.numpy(), "r_eye")
    assert torch.equal(face_parser.image_side_eyes(fixed), fixed)
    assert torch.equal(fixed > 0, raw > 0)


def test_augment_moves_images_and_labels_together():
    _, labels = face_parser.eval_faces(8, seed=3)
    painted = torch.from_numpy(face_parser.colourise(labels))  # an "image" whose pixels spell out its labels
    x, y = face_parser._augment(painted, torch.from_numpy(labels), torch.Generator().manual_seed(0))
    eyes = np.isin(y.numpy(), [face_parser.FACE_INDEX["l_eye"], face_parser.FACE_INDEX["r_eye"]])
    same = (face_parser.colourise(y.numpy()) == x.numpy()).all(-1)
    assert same[~eyes].all() and not torch.equal(y, torch.from_numpy(labels))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("face-parser")
    face_parser.train(out, steps=2, batch_size=4, num_images=16, eval_images=8, workers=1)
    return out


def test_training_writes_a_folder_plain_transformers_loads_in_float32(trained):
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "training.json", "loss.png",
                 "samples.png"):
        assert (trained / name).is_file(), name
    model = SegformerForSemanticSegmentation.from_pretrained(trained)
    assert model.dtype == torch.float32
    assert model.config.id2label == dict(enumerate(world.FACE_LABELS))
    assert SegformerImageProcessor.from_pretrained(trained).size == {"height": 128, "width": 128}
    assert (trained / "model.safetensors").stat().st_size < 3_000_000
    record = json.loads((trained / "training.json").read_text())
    assert record["steps_done"] == 2 and set(record["gate"]["labels"]) == {"hair", "eye_g", "hat"}


def test_parse_gives_label_ids_at_the_input_size(trained):
    model, processor = face_parser.load_face_parser(trained)
    images, _ = face_parser.eval_faces(3, seed=5)
    inputs = [Image.fromarray(images[0]), images[1], images[2]]
    labels = face_parser.parse(model, processor, inputs)
    assert labels.shape == (3, 64, 64) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(world.FACE_LABELS)
    scores = face_parser.mean_iou(model, processor, n=4)
    assert set(scores) == {"hair", "eye_g", "hat", "mean"} and all(0 <= v <= 1 for v in scores.values())


def test_missing_parser_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain face-parser") as info:
        face_parser.load_face_parser(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)
