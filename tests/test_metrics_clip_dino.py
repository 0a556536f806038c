"""CLIP-T / CLIP-I / TI-CLIP / DINO-I against independent plain-torch computations, on tiny random models.

The models are built here from small configs, saved as local folders (open_clip: ``open_clip_config.json`` +
``open_clip_model.safetensors``; transformers: ``save_pretrained``) and loaded back through the metric loader.
The reference computations below read the same weights on their own and use only torch, PIL and numpy.
"""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from t2i_personal.errors import ModelLoadError
from t2i_personal.metrics import ClipImageScore, ClipTextScore, DinoImageScore, TIClipScore, load_metric_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
PROMPTS = ["a photo of a dog", "a red car on the beach", "a cat in the snow"]


def _random_images(count, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]


# ------------------------------------------------------------------------------------------------------ tiny CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP_CFG)
    folder = tmp_path_factory.mktemp("tiny-open-clip")
    preprocess_cfg = {"size": [32, 32], "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG,
                                                              "preprocess_cfg": preprocess_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def reference_clip(clip_dir):
    """The same weights, read without the package: open_clip's model class + safetensors."""
    from open_clip.model import CLIP

    model = CLIP(**TINY_CLIP_CFG)
    model.load_state_dict(load_file(clip_dir / "open_clip_model.safetensors"))
    return model.eval()


def _plain_image_features(model, images):
    """32x32 uint8 images need no resize or crop: scale to [0, 1], normalise, encode, L2-normalise."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f = model.encode_image(x)
    return f / f.norm(dim=-1, keepdim=True)


def _plain_text_features(model, texts):
    from open_clip.tokenizer import tokenize

    with torch.no_grad():
        f = model.encode_text(tokenize(texts))
    return f / f.norm(dim=-1, keepdim=True)


def test_local_open_clip_folder_loads_with_names_recorded(clip_dir):
    loaded = load_metric_model(clip_dir)
    assert loaded.library == "open_clip"
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    info = ClipTextScore(loaded, progress=False).describe()
    assert info["metric"] == "CLIP-T" and info["scale"] == "raw cosine"
    assert info["backbone"] == clip_dir.name and info["pretrained"] == str(clip_dir.resolve())
    assert info["embed_dim"] == 16


def test_clip_t_and_ti_clip_equal_plain_cosine(clip_dir, reference_clip):
    images = _random_images(3)
    expected = (_plain_image_features(reference_clip, images) * _plain_text_features(reference_clip, PROMPTS)).sum(1)
    model = load_metric_model(clip_dir)
    clip_t = ClipTextScore(model, progress=False)(images, PROMPTS)
    ti_clip = TIClipScore(model, progress=False)(images, PROMPTS)
    assert clip_t.shape == (3,)
    torch.testing.assert_close(clip_t, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ti_clip, expected, atol=1e-5, rtol=1e-4)
    # one prompt for all images
    single = ClipTextScore(model, progress=False)(images, PROMPTS[0])
    expected_single = _plain_image_features(reference_clip, images) @ _plain_text_features(reference_clip, PROMPTS[:1])[0]
    torch.testing.assert_close(single, expected_single, atol=1e-5, rtol=1e-4)


def test_clip_i_is_mean_pairwise_cosine_and_one_for_identical_images(clip_dir, reference_clip):
    generated, references = _random_images(4, seed=1), _random_images(3, seed=2)
    expected = (_plain_image_features(reference_clip, generated)
                @ _plain_image_features(reference_clip, references).T).mean(dim=1)
    metric = ClipImageScore(load_metric_model(clip_dir), progress=False)
    torch.testing.assert_close(metric(generated, references=references), expected, atol=1e-5, rtol=1e-4)
    same = [generated[0]] * 3
    torch.testing.assert_close(metric(same, references=same), torch.ones(3), atol=1e-5, rtol=0)


def test_clip_batch_size_does_not_change_results(clip_dir):
    images, references = _random_images(7, seed=3), _random_images(5, seed=4)
    prompts = [PROMPTS[i % 3] for i in range(7)]
    model = load_metric_model(clip_dir)
    results = []
    for batch_size in (1, 3, 16):
        results.append((ClipTextScore(model, batch_size=batch_size, progress=False)(images, prompts),
                        ClipImageScore(model, batch_size=batch_size, progress=False)(images, references=references)))
    for clip_t, clip_i in results[1:]:
        torch.testing.assert_close(clip_t, results[0][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(clip_i, results[0][1], atol=1e-5, rtol=1e-4)


def test_reference_embeddings_are_cached_per_concept(clip_dir, tmp_path):
    metric = ClipImageScore(load_metric_model(clip_dir), progress=False)
    calls = []
    embed = metric._embed_images
    metric._embed_images = lambda ims: calls.append(len(ims)) or embed(ims)
    references = _random_images(3, seed=5)
    for i, ref in enumerate(references):
        Image.fromarray(ref).save(tmp_path / f"{i}.png")
    first = metric(_random_images(2, seed=6), references=references)
    second = metric(_random_images(2, seed=6), references=tmp_path)  # same pictures, given as a folder
    assert calls == [3, 2, 2]  # references embedded once, generated images each time
    torch.testing.assert_close(first, second)
    metric(_random_images(2, seed=6), references=_random_images(3, seed=7))  # another concept: embedded anew
    assert calls[-2:] == [3, 2]


def test_metrics_check_their_inputs(clip_dir):
    model = load_metric_model(clip_dir)
    with pytest.raises(ValueError, match="prompts"):
        ClipTextScore(model, progress=False)(_random_images(2))
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        ClipTextScore(model, progress=False)(_random_images(2), PROMPTS)
    with pytest.raises(ValueError, match="reference"):
        ClipImageScore(model, progress=False)(_random_images(2))


def test_input_forms_give_the_same_scores(clip_dir):
    images = _random_images(2, seed=8)
    metric = ClipTextScore(load_metric_model(clip_dir), progress=False)
    base = metric(images, PROMPTS[:2])
    as_tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    for form in (np.stack(images), [Image.fromarray(im) for im in images], as_tensor):
        torch.testing.assert_close(metric(form, PROMPTS[:2]), base, atol=1e-5, rtol=1e-4)


def test_pickle_only_open_clip_folder_is_refused(clip_dir, tmp_path):
    (tmp_path / "open_clip_config.json").write_text((clip_dir / "open_clip_config.json").read_text())
    torch.save(load_file(clip_dir / "open_clip_model.safetensors"), tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_metric_model(tmp_path)
    assert load_metric_model(tmp_path, allow_pickle=True).library == "open_clip"


# ------------------------------------------------------------------------------------------------------ tiny DINO


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessor, ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    folder = tmp_path_factory.mktemp("tiny-dino")
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=Image.BICUBIC, do_center_crop=True,
                      crop_size={"height": 224, "width": 224}, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD), do_convert_rgb=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_dino(dino_dir):
    from transformers import ViTModel

    return ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()


def _plain_dino_features(model, images):
    """Shorter side to 256 (PIL bicubic), center crop 224, [0, 1], ImageNet mean/std, [CLS], L2-normalised."""
    batch = []
    for array in images:
        im = Image.fromarray(array)
        w, h = im.size
        size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        im = im.resize(size, Image.BICUBIC)
        left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
        im = im.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
        batch.append((x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))
    with torch.no_grad():
        cls = model(pixel_values=torch.stack(batch)).last_hidden_state[:, 0]
    return cls / cls.norm(dim=-1, keepdim=True)


def test_dino_i_equals_plain_computation_and_one_for_identical_images(dino_dir, reference_dino):
    generated = _random_images(2, size=(64, 64), seed=9) + _random_images(1, size=(80, 60), seed=10)
    references = _random_images(2, size=(64, 64), seed=11)
    expected = (_plain_dino_features(reference_dino, generated)
                @ _plain_dino_features(reference_dino, references).T).mean(dim=1)
    loaded = load_metric_model(dino_dir)
    assert loaded.library == "transformers"
    metric = DinoImageScore(loaded, progress=False)
    torch.testing.assert_close(metric(generated, references=references), expected, atol=1e-5, rtol=1e-4)
    same = [generated[0]] * 2
    torch.testing.assert_close(metric(same, references=same), torch.ones(2), atol=1e-5, rtol=0)
    info = metric.describe()
    assert info["metric"] == "DINO-I" and info["scale"] == "raw cosine" and info["backbone"] == dino_dir.name
    assert "256" in info["preprocess"] and "224" in info["preprocess"]


def test_dino_processor_mode_matches_the_protocol(dino_dir):
    generated, references = _random_images(2, size=(64, 64), seed=12), _random_images(2, size=(64, 64), seed=13)
    loaded = load_metric_model(dino_dir)
    protocol = DinoImageScore(loaded, progress=False)(generated, references=references)
    processor = DinoImageScore(loaded, preprocess="processor", progress=False)(generated, references=references)
    torch.testing.assert_close(processor, protocol, atol=1e-4, rtol=0)


def test_dino_batch_size_does_not_change_results(dino_dir):
    generated, references = _random_images(5, size=(64, 64), seed=14), _random_images(3, size=(64, 64), seed=15)
    loaded = load_metric_model(dino_dir)
    one = DinoImageScore(loaded, batch_size=1, progress=False)(generated, references=references)
    many = DinoImageScore(loaded, batch_size=4, progress=False)(generated, references=references)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------- hub / builtin


def test_missing_hub_model_offline_names_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-dino") as info:
        load_metric_model("no-such-org/no-such-dino")
    assert "--local-dir" in str(info.value)
    with pytest.raises(ModelLoadError, match="pretrained tag"):
        load_metric_model("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_metric_model("ViT-B-32", pretrained="/somewhere/weights.pt")


def test_builtin_toy_clip_prefers_the_matching_caption():
    from t2i_personal.toyworld import world
    from t2i_personal.toyworld.dataset import render_set

    data = render_set(6, seed=5, kind="world", workers=1)
    captions = [world.describe(s, full=True) for s in data.scenes]
    rng = random.Random(0)
    mismatched = [world.describe(world.sample_scene(rng), full=True) for _ in captions]
    metric = ClipTextScore("builtin:toy-clip", progress=False)
    assert metric.describe()["backbone"] == "toy-clip"
    matching = metric(data.images, captions)
    other = metric(data.images, mismatched)
    assert (matching > other).all(), (matching, other)
    clip_i = ClipImageScore("builtin:toy-clip", progress=False)
    torch.testing.assert_close(clip_i(data.images[:1], references=data.images[:1]), torch.ones(1), atol=1e-5, rtol=0)
