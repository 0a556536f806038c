"""The procedural world: determinism, labels, masks, captions, held-out split and shipped assets."""

import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from t2i_personal.toyworld import assets, world
from t2i_personal.toyworld.dataset import render_set


def test_same_seed_same_image_caption_and_scene():
    a, b = world.sample_pair(1234), world.sample_pair(1234)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], world.sample_pair(1235)[0])
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8


def test_render_set_does_not_depend_on_worker_count():
    one, two = render_set(300, seed=5, workers=1), render_set(300, seed=5, workers=2)
    assert np.array_equal(one.images, two.images) and one.captions == two.captions


def test_vocabulary_covers_what_the_issue_asks_for():
    assert {"dog", "cat", "car", "vase", "teddy bear", "face"} <= set(world.CLASSES)
    assert len(world.COLOURS) >= 6 and set(world.PATTERNS) == {"plain", "striped", "spotted", "checkered"}
    assert len(world.SCENES) >= 8 and len(world.HAT_COLOURS) >= 3
    assert {"dog", "car", "face"} <= set(world.SUBJECTS)


@pytest.mark.parametrize("cls", world.CLASSES)
def test_object_colour_is_where_the_body_mask_is(cls):
    rng = random.Random(0)
    s = replace(world.sample_scene(rng, cls=cls, accessory_rate=0), colour="blue", pattern="plain", scene="snow")
    r = world.render(s)
    part = r.masks["cloth" if cls == "face" else "body"]
    assert part.sum() > 40
    inside = r.image[part].astype(int)
    blue = np.all(np.abs(inside - world.COLOURS["blue"]) < 40, axis=1)
    assert blue.mean() > (0.7 if cls != "car" else 0.4)  # ears, eyes, a car's wheels and windows are body too
    far_corner = r.image[:4, :4].reshape(-1, 3).astype(int)  # snow sky
    assert np.all(np.abs(far_corner - (175, 190, 210)) < 30)


def test_accessory_masks_sit_where_they_belong():
    s = world.Scene(cls="face", hat="red", glasses=True, scarf="blue", hair_length="long", scene="grass")
    r = world.render(s)
    m = r.masks
    assert m["hat"].sum() > 30 and m["glasses"].sum() > 20 and m["scarf"].sum() > 20
    rows = lambda mask: np.nonzero(mask.any(axis=1))[0]
    assert rows(m["hat"]).mean() < rows(m["glasses"]).mean() < rows(m["scarf"]).mean()
    eyes = world.render(replace(s, glasses=False)).masks["l_eye"]  # glasses cover the eyes entirely
    assert rows(eyes).mean() == pytest.approx(rows(m["glasses"]).mean(), abs=2)
    hat_pixels = r.image[m["hat"]].astype(int)
    assert np.mean(np.all(np.abs(hat_pixels - world.COLOURS["red"]) < 60, axis=1)) > 0.6
    labels = r.face_label_map()
    assert set(np.unique(labels)) >= {world.FACE_LABELS.index(k) for k in ("background", "skin", "hair", "eye_g", "hat")}
    assert np.array_equal(labels == world.FACE_LABELS.index("hat"), m["hat"])


def test_non_faces_have_no_face_labels_and_masks_do_not_overlap():
    r = world.render(world.Scene(cls="dog", hat="blue", glasses=True))
    assert not r.face_label_map().any()
    stacked = np.stack([r.masks[p] for p in world.PART_NAMES])
    assert stacked.sum(axis=0).max() <= 1


def test_captions_name_what_is_drawn():
    s = world.Scene(cls="teddy bear", colour="green", pattern="striped", hat="red", scene="beach")
    assert world.describe(s, full=True) == "a photo of a green striped teddy bear wearing a red hat on the beach"
    face = world.Scene(cls="face", hair_colour="blonde", hair_length="long", expression="smiling", glasses=True,
                       colour="blue", scene="snow")
    assert world.describe(face, full=True) == ("a photo of a smiling person with long blonde hair in a blue shirt "
                                               "wearing glasses in the snow")
    rng = random.Random(0)
    captions = {world.describe(s, rng) for _ in range(50)}
    assert len(captions) > 5  # several templates, attributes sometimes left out


def test_held_out_triples_never_appear_in_pretraining_data():
    held = set(world.held_out_combinations())
    assert 20 <= len(held) <= 60
    data = render_set(600, seed=3, kind="world", workers=1)
    assert not any((s.cls, s.colour, s.scene) in held for s in data.scenes)
    assert all(s.subject is None for s in data.scenes)


def test_personal_subjects_keep_their_identity_across_views():
    rng = random.Random(1)
    views = [world.render(world.subject_scene("dog", rng)) for _ in range(4)]
    for v in views:
        body = v.image[v.masks["body"]].astype(int)
        teal = np.all(np.abs(body - (0, 150, 150)) < 30, axis=1)
        assert teal.mean() > 0.4 and v.scene.subject == "dog"
    ordinary = render_set(200, seed=9, workers=1)
    teal_share = [np.all(np.abs(img.astype(int) - (0, 150, 150)) < 20, axis=-1).mean() for img in ordinary.images]
    assert max(teal_share) < 0.02  # nothing in the ordinary world is the personal dog's teal


def test_styles_change_the_look_but_not_the_layout():
    s = world.sample_scene(random.Random(4))
    plain, poster = world.render(s).image, world.render(s, style="outline-poster").image
    assert len(np.unique(poster.reshape(-1, 3), axis=0)) <= 28  # 3 levels per channel + the outline colour
    assert np.array_equal(world.render(s).masks["body"], world.render(s, style="outline-poster").masks["body"])
    assert not np.array_equal(plain, poster)
    with pytest.raises(ValueError, match="styles"):
        world.render(s, style="cubism")


def test_shipped_assets_match_their_generator(tmp_path):
    assets.write_assets(tmp_path)
    shipped = sorted(p.relative_to(assets.ASSETS) for p in assets.ASSETS.rglob("*.png"))
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert shipped == fresh and len(shipped) == 3 * assets.SUBJECT_IMAGES + 2 * assets.STYLE_IMAGES
    for rel in shipped:
        assert np.array_equal(np.array(Image.open(assets.ASSETS / rel)), np.array(Image.open(tmp_path / rel))), rel
    caption = (assets.style_dirs()["people"] / "outline-poster-00.txt").read_text()
    assert caption.startswith("a {V} style painting of ")
    with pytest.raises(KeyError, match="subjects"):
        assets.subject_dir("unicorn")


def test_labelled_rows_places_each_block_after_the_label_column_in_order():
    from t2i_personal.toyworld.reports import labelled_rows

    red, blue = np.zeros((2, 4, 4, 3), np.uint8), np.zeros((3, 4, 4, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    picture = labelled_rows({"run a": [red, blue], "run b": [blue[:2], np.concatenate([red, red[:1]])]}, ["personal", "plain"], scale=2)
    label_w, header_h, gap = 150, 18, 12
    assert picture.size == (label_w + 2 * 8 + gap + 3 * 8, header_h + 2 * 8)
    assert picture.getpixel((label_w + 1, header_h + 1)) == (255, 0, 0)  # run a, first block
    assert picture.getpixel((label_w + 2 * 8 + gap + 1, header_h + 1)) == (0, 0, 255)  # run a, second block
    assert picture.getpixel((label_w + 1, header_h + 8 + 1)) == (0, 0, 255)  # run b, first block
    assert picture.getpixel((label_w + 2 * 8 + 3, header_h + 3)) == (255, 255, 255)  # the gap stays white
    label_pixels = np.asarray(picture.crop((0, header_h, label_w, header_h + 8)))
    assert (label_pixels < 128).any()  # the run name is written
