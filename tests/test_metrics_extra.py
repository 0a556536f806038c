"""FID/KID (torchmetrics), CP-CLIP (Gen4Gen) and BLIP ITC scores, on tiny models only.

FID/KID run on a tiny custom feature module and the shipped toy CLIP; CP-CLIP on a fake detector (exact arithmetic)
and a tiny random OWL-ViT saved and loaded back; BLIP-1 / BLIP-2 ITC on tiny random retrieval models saved with
``save_pretrained`` (model + processor), checked against a plain projection-and-dot-product computation.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_personal.errors import ModelLoadError
from t2i_personal.metrics import ClipImageScore
from t2i_personal.metrics.blip import BlipTextScore
from t2i_personal.metrics.cp_clip import CPClipScore, OwlVitDetector
from t2i_personal.metrics.fid import ImageSetDistance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _noise(count, seed, size=32):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _flat(count, seed, size=32):
    rng = np.random.default_rng(seed)
    return [np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8) for _ in range(count)]


class TinyFeatures(torch.nn.Module):
    """A fixed random projection of 8x8 pooled pixels: a deterministic, tiny custom feature module."""

    def __init__(self, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 4, dim)

    def forward(self, x):
        return 10 * self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


# --------------------------------------------------------------------------------------------------------- FID/KID


def test_fid_self_zero_and_different_positive():
    metric = ImageSetDistance(TinyFeatures(), image_size=32, progress=False, kid_subsets=20)
    a, b = _noise(12, 0), _flat(12, 1)
    same = metric.evaluate(a, a)
    other = metric.evaluate(b, a)
    assert abs(same.fid) < 1e-3
    assert other.fid > 1.0
    assert other.kid > same.kid
    info = same.to_dict()
    assert info["feature_extractor"].startswith("custom module TinyFeatures")
    assert info["count_generated"] == 12 and info["count_reference"] == 12
    assert info["kid_x1e3"] == pytest.approx(same.kid * 1e3)


def test_fid_toy_clip_and_kid_clamping(tmp_path):
    for i, arr in enumerate(_noise(5, 2)):
        Image.fromarray(arr).save(tmp_path / f"{i:02d}.png")
    metric = ImageSetDistance("builtin:toy-clip", kid_subset_size=50, kid_subsets=10, progress=False)
    gen = _flat(8, 3)
    result = metric.evaluate(gen, tmp_path)  # reference folder of 5 images
    info = result.to_dict()
    assert info["kid_subset_size"] == 5 and info["kid_subset_size_requested"] == 50
    assert "clamped from 50 to 5" in info["note"]
    assert "toy-clip" in info["feature_extractor"]
    assert result.fid > 0 and np.isfinite(result.kid)
    assert abs(metric.fid(tmp_path, tmp_path)) < 1e-3
    # KID is repeatable (seeded subsets) and a subset size within both sets is not clamped
    assert metric.kid(gen, tmp_path) == metric.kid(gen, tmp_path)
    small = ImageSetDistance("builtin:toy-clip", kid_subset_size=3, kid_subsets=5, progress=False)
    small.evaluate(gen, tmp_path)
    assert small.describe()["kid_subset_size"] == 3 and "note" not in small.describe()


def test_fid_default_inception_offline_error(monkeypatch, tmp_path):
    from torchmetrics.utilities import imports

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        ImageSetDistance()
    message = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "builtin:toy-clip" in message
    if not imports._TORCH_FIDELITY_AVAILABLE:
        assert "torch-fidelity" in message


class FakeInception(torch.nn.Module):
    """Stands in for torchmetrics' Inception (uint8 batches of any size -> features)."""

    def forward(self, x):
        assert x.dtype == torch.uint8
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), torch.full((len(x), 1), float(x.shape[-1]))], dim=1)


def test_inception_path_mixed_sizes(monkeypatch):
    from t2i_personal.metrics import fid as fid_module

    monkeypatch.setattr(fid_module, "_load_inception", lambda weights: FakeInception())
    images = _noise(3, 7, size=32) + _noise(2, 8, size=48) + _noise(1, 9, size=32)
    metric = ImageSetDistance(batch_size=4, progress=False)
    together = metric.features(images)
    one_by_one = torch.cat([metric.features([im]) for im in images])
    assert torch.allclose(together, one_by_one)
    assert together[:, -1].tolist() == [32, 32, 32, 48, 48, 32]  # each image at its own size, order kept
    assert "NoTrainInceptionV3" in metric.describe()["feature_extractor"]
    assert metric.evaluate(images[:3], images[3:5]).fid > 0


def test_fid_needs_two_images():
    metric = ImageSetDistance(TinyFeatures(), image_size=32, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        metric.evaluate(_noise(1, 0), _noise(4, 1))


# --------------------------------------------------------------------------------------------------------- CP-CLIP


class FakeDetector:
    """Returns fixed boxes per query (label = query index), whatever the image."""

    def __init__(self, boxes_by_query):
        self.boxes_by_query = boxes_by_query

    def __call__(self, image, queries, threshold):
        boxes, scores, labels = [], [], []
        for q, query in enumerate(queries):
            for box, score in self.boxes_by_query.get(query, []):
                boxes.append(box)
                scores.append(score)
                labels.append(q)
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.long)}


def _composition():
    """A 64x64 image made of three 32x32 quadrants copied from three concepts' pictures (bottom-right is blank)."""
    refs = {"dog": _noise(3, 10), "cat": _flat(3, 11), "plant": _noise(3, 12)}
    canvas = np.zeros((64, 64, 3), dtype=np.uint8)
    canvas[:32, :32] = refs["dog"][0]
    canvas[:32, 32:] = refs["cat"][0]
    canvas[32:, :32] = refs["plant"][0]
    return Image.fromarray(canvas), refs


def _expected(clip, crops, refs):
    ref_embs = [clip.reference_embeddings(r) for r in refs]
    total = 0.0
    for crop in crops:
        emb = clip._embed_images([crop])
        total += max(float((emb @ r.T).mean()) for r in ref_embs)
    return total


def test_cp_clip_missing_concept_adds_zero():
    image, refs = _composition()
    boxes = {"dog": [((0, 0, 32, 32), 0.9), ((0, 0, 10, 10), 0.5)],  # the lower-scored duplicate is dropped
             "cat": [((32, 0, 64, 32), 0.8)],
             "plant": [((32, 32, 64, 64), 0.05)]}  # below the 0.1 threshold: plant is "missing"
    clip = ClipImageScore("builtin:toy-clip", progress=False)
    metric = CPClipScore(clip, detector=FakeDetector(boxes))
    concepts = [("dog", refs["dog"]), ("cat", refs["cat"]), {"class_noun": "plant", "references": refs["plant"]}]
    result = metric.evaluate([image, image], concepts)
    crops = [image.crop((0, 0, 32, 32)), image.crop((32, 0, 64, 32))]
    expected = _expected(clip, crops, list(refs.values())) / 3
    assert result.per_image.tolist() == pytest.approx([expected, expected], abs=1e-5)
    assert result.detection_rate.tolist() == pytest.approx([2 / 3, 2 / 3])
    out = result.to_dict()
    assert out["detection_rate_mean"] == pytest.approx(2 / 3)
    assert out["threshold"] == 0.1 and out["detector"] == "custom FakeDetector"
    # lowering the threshold brings the plant back: the score becomes the sum of all three over 3
    low = CPClipScore(clip, detector=FakeDetector(boxes), threshold=0.01)(image, concepts)
    crops.append(image.crop((32, 32, 64, 64)))
    assert float(low[0]) == pytest.approx(_expected(clip, crops, list(refs.values())) / 3, abs=1e-5)
    # nothing detected: 0
    assert float(CPClipScore(clip, detector=FakeDetector({}))(image, concepts)[0]) == 0.0


def test_cp_clip_shared_class_top_k_and_literal():
    image, refs = _composition()
    boxes = {"dog": [((0, 0, 32, 32), 0.9), ((1, 1, 31, 31), 0.85), ((32, 0, 64, 32), 0.7)]}
    clip = ClipImageScore("builtin:toy-clip", progress=False)
    concepts = [("dog", refs["dog"], "dog1"), ("dog", refs["cat"], "dog2")]
    top_k = CPClipScore(clip, detector=FakeDetector(boxes)).evaluate(image, concepts)
    # the near-duplicate box is suppressed by NMS, so the two kept boxes are the two quadrants
    crops = [image.crop((0, 0, 32, 32)), image.crop((32, 0, 64, 32))]
    assert float(top_k.per_image[0]) == pytest.approx(_expected(clip, crops, [refs["dog"], refs["cat"]]) / 2,
                                                      abs=1e-5)
    assert float(top_k.detection_rate[0]) == 1.0
    literal = CPClipScore(clip, detector=FakeDetector(boxes), same_class="literal").evaluate(image, concepts)
    assert float(literal.detection_rate[0]) == 0.5
    assert literal.info["concepts"] == ["dog1", "dog2"]


def _clip_tokenizer_files(folder):
    """A character-level CLIP BPE vocabulary (bytes, bytes + '</w>', specials) and no merges: tiny and offline."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2's byte -> unicode table, which CLIP's BPE uses
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    return len(vocab)


@pytest.fixture(scope="module")
def owlvit_dir(tmp_path_factory):
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny-owlvit")
    tok_dir = tmp_path_factory.mktemp("owl-tok")
    vocab = _clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16,
                              pad_token="!")
    config = OwlViTConfig(
        text_config={"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16,
                     "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": 0},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).save_pretrained(folder)
    image_processor = OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_tiny_owlvit_loads_and_runs(owlvit_dir):
    detector = OwlVitDetector(owlvit_dir)
    image, refs = _composition()
    out = detector(image, ["dog", "cat"], 0.0)
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"]) == len(out["labels"]) == 16
    assert set(out["labels"].tolist()) <= {0, 1}
    metric = CPClipScore("builtin:toy-clip", detector=str(owlvit_dir), threshold=0.0, progress=False)
    result = metric.evaluate(image, [("dog", refs["dog"]), ("cat", refs["cat"])])
    assert result.per_image.shape == (1,) and np.isfinite(float(result.per_image[0]))
    assert result.info["detector_pretrained"] == str(owlvit_dir.resolve())


def _skip_if_cached(repo):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        pytest.skip(f"{repo} is in this machine's hub cache: the offline error cannot be shown")


def test_owlvit_missing_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _skip_if_cached("google/owlvit-base-patch32")
    with pytest.raises(ModelLoadError, match="huggingface-cli download google/owlvit-base-patch32"):
        OwlVitDetector()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no weights"):
        OwlVitDetector(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------------ BLIP


def _bert_tokenizer(folder):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + list("abcdefghijklmnopqrstuvwxyz") + \
        ["a", "photo", "of", "dog", "cat", "on", "the", "beach", "red", "car"]
    words = list(dict.fromkeys(words))
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=16), len(words)


TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 32}
VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
BLIP_PROMPTS = ["a photo of a dog", "a red car on the beach", "a cat"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    tokenizer, vocab = _bert_tokenizer(tmp_path_factory.mktemp("bert-tok"))
    config = BlipConfig(text_config=dict(TEXT, vocab_size=vocab, encoder_hidden_size=16),
                        vision_config=VISION, projection_dim=16, image_text_hidden_size=8)
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, BlipImageProcessor

    folder = tmp_path_factory.mktemp("tiny-blip2")
    tokenizer, vocab = _bert_tokenizer(tmp_path_factory.mktemp("bert-tok2"))
    config = Blip2Config(vision_config=VISION,
                         qformer_config=dict(TEXT, vocab_size=vocab, encoder_hidden_size=16,
                                             cross_attention_frequency=1, use_qformer_text_input=True),
                         num_query_tokens=4, image_text_hidden_size=8)
    torch.manual_seed(0)
    Blip2ForImageTextRetrieval(config).save_pretrained(folder)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=None)
    processor.save_pretrained(folder)
    return folder


def _inputs(folder, images, texts, processor_cls):
    processor = processor_cls.from_pretrained(folder)
    return processor(images=[Image.fromarray(a) for a in images], text=texts, return_tensors="pt", padding=True)


@torch.no_grad()
def test_blip1_itc_matches_projection_dot_product(blip_dir):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    images = _noise(3, 5)
    metric = BlipTextScore(blip_dir, batch_size=2, progress=False)
    scores = metric(images, BLIP_PROMPTS)
    model = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    inputs = _inputs(blip_dir, images, BLIP_PROMPTS, BlipProcessor)
    image_cls = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]
    text_cls = model.text_encoder(input_ids=inputs["input_ids"],
                                  attention_mask=inputs["attention_mask"]).last_hidden_state[:, 0]
    img = torch.nn.functional.normalize(model.vision_proj(image_cls), dim=-1)
    txt = torch.nn.functional.normalize(model.text_proj(text_cls), dim=-1)
    assert scores.tolist() == pytest.approx((img * txt).sum(-1).tolist(), abs=1e-5)
    info = metric.describe()
    assert info["metric"] == "BLIP-ITC (BLIP-1, the official ClassDiffusion 'BLIP2-T')"
    assert info["pretrained"] == str(blip_dir.resolve())
    assert metric(images[0], "a cat").shape == (1,)


@torch.no_grad()
def test_blip2_itc_matches_projection_dot_product(blip2_dir):
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    images = _noise(3, 6)
    metric = BlipTextScore(blip2_dir, variant="blip2", progress=False)
    scores = metric(images, BLIP_PROMPTS)
    model = Blip2ForImageTextRetrieval.from_pretrained(blip2_dir).eval()
    inputs = _inputs(blip2_dir, images, BLIP_PROMPTS, Blip2Processor)
    vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    queries = model.qformer(query_embeds=model.query_tokens.expand(len(images), -1, -1),
                            encoder_hidden_states=vision,
                            encoder_attention_mask=torch.ones(vision.shape[:2], dtype=torch.long)).last_hidden_state
    text = model.qformer(query_embeds=model.embeddings(input_ids=inputs["input_ids"]), query_length=0,
                         attention_mask=inputs["attention_mask"]).last_hidden_state[:, 0]
    img = torch.nn.functional.normalize(model.vision_projection(queries), dim=-1)  # (N, Q, D)
    txt = torch.nn.functional.normalize(model.text_projection(text), dim=-1)  # (N, D)
    expected = (img * txt[:, None]).sum(-1).max(dim=1).values
    assert scores.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert metric.describe()["metric"] == "BLIP-2 ITC"


def test_blip_missing_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _skip_if_cached("Salesforce/blip-itm-large-coco")
    with pytest.raises(ModelLoadError, match="Salesforce/blip-itm-large-coco"):
        BlipTextScore()
    with pytest.raises(ValueError, match="variant"):
        BlipTextScore(variant="blip3")
