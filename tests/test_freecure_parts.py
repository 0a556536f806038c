"""FreeCure's parts: keyword table, face parsers through the one loader, APG, foundations of each kind, CLI and
evaluator."""

import json

import numpy as np
import pytest
import torch
from conftest import base_config, run_training
from PIL import Image

from t2i_personal.errors import ConfigError, ModelLoadError
from t2i_personal.freecure import FreeCure
from t2i_personal.freecure import apg
from t2i_personal.freecure.masks import (face_attribute, face_parsing_mask, find_attributes, load_face_parser,
                                         otsu_threshold, token_positions, user_mask)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3
SIZE = 32


# ------------------------------------------------------------------------------------------------ keyword table


def test_keyword_table_matches_whole_words():
    assert face_attribute("eyeglasses") == "glasses" and face_attribute("sunglasses") == "glasses"
    assert face_attribute("eyes") == "eyes" and face_attribute("curly red hair") == "hair"
    assert face_attribute("earrings") == "earrings" and face_attribute("necklace") == "necklace"
    assert face_attribute("lips") == "mouth" and face_attribute("nose") == "nose"
    assert face_attribute("hat") == "hat" and face_attribute("eyebrows") == "eyebrows"
    assert face_attribute("headphone") is None
    assert find_attributes("a sks man with eyeglasses and curly red hair") == ["eyeglasses", "hair"]
    assert find_attributes("a sks dog wearing a headphone and a scarf") == ["headphone", "scarf"]
    assert find_attributes("a photo of a sks vase") == []


def test_otsu_splits_two_modes():
    values = torch.cat([torch.full((100,), 0.1), torch.full((30,), 0.8)])
    assert 0.1 < otsu_threshold(values) <= 0.8


def test_token_positions_find_multi_token_phrases():
    from t2i_personal.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    ids = tok("a dog wearing a red hat").input_ids
    pos = token_positions(tok, "a dog wearing a red hat", "red hat")
    assert len(pos) == 2 and [ids[i] for i in pos] == tok("red hat", add_special_tokens=False).input_ids
    assert token_positions(tok, "a dog", "scarf") == []


def test_user_mask_accepts_files_and_rejects_bad_ones(tmp_path):
    image = np.zeros((64, 64), np.uint8)
    image[:32] = 255
    Image.fromarray(image).convert("RGBA").save(tmp_path / "mask.png")
    mask = user_mask(tmp_path / "mask.png", 2, (8, 8))
    assert mask.shape == (2, 1, 8, 8) and mask[0, 0, :4].all() and not mask[0, 0, 4:].any()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="broken.png"):
        user_mask(tmp_path / "broken.png", 1, (8, 8))
    with pytest.raises(ConfigError, match="2-D"):
        user_mask(np.zeros((4, 4, 4, 4)), 1, (8, 8))


# ---------------------------------------------------------------------------------------------- face parsers


def _tiny_segformer(folder, safetensors=True):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from t2i_personal.toyworld.world import FACE_LABELS

    torch.manual_seed(0)
    config = SegformerConfig(hidden_sizes=[8, 8, 8, 8], num_attention_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                             decoder_hidden_size=8, num_labels=len(FACE_LABELS),
                             id2label=dict(enumerate(FACE_LABELS)), label2id={n: i for i, n in enumerate(FACE_LABELS)})
    model = SegformerForSemanticSegmentation(config)
    model.save_pretrained(folder)
    if not safetensors:  # transformers 5 always writes safetensors: make the pickle-only folder by hand
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_tiny_random_segformer_through_the_real_loader(tmp_path):
    parser = load_face_parser(str(_tiny_segformer(tmp_path / "parser")))
    assert parser.label_ids("glasses") == [3] and parser.label_ids("eyes") == [4, 5]
    mask = face_parsing_mask(parser, [Image.new("RGB", (32, 32), "white")] * 2, "hair", (8, 8))
    assert mask.shape == (2, 1, 8, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ConfigError, match="not a face part"):
        parser.label_ids("headphone")
    _tiny_segformer(tmp_path / "pickled", safetensors=False)
    with pytest.raises(ModelLoadError, match="pickle|safetensors"):
        load_face_parser(str(tmp_path / "pickled"))
    with pytest.raises(ModelLoadError, match="no-such/face-parser"):
        load_face_parser("no-such/face-parser")


def test_toy_face_parser_finds_the_hair_of_a_rendered_face():
    import random

    from t2i_personal.toyworld import world

    parser = load_face_parser("builtin:toy-face-parser")
    rendered = world.render(world.sample_scene(random.Random(3), cls="face", accessory_rate=0.0))
    truth = torch.from_numpy(rendered.face_label_map() == world.FACE_LABELS.index("hair")).float()[None, None]
    truth = (torch.nn.functional.adaptive_avg_pool2d(truth, (16, 16)) >= 0.5).float()
    mask = face_parsing_mask(parser, [Image.fromarray(rendered.image)], "hair", (16, 16))
    overlap = (mask * truth).sum() / torch.maximum(mask, truth).sum()
    assert truth.sum() > 0 and overlap > 0.6


# ------------------------------------------------------------------------------------------------------- APG


def test_expression_words_and_neutral_prompt():
    assert apg.expression_words_in("a sks man laughing happily") == ["laughing", "happily"]
    assert apg.neutral_prompt("a sks man laughing happily") == "a sks man"
    assert apg.neutral_prompt("a smiling sks woman with glasses") == "a sks woman with glasses"
    assert apg.neutral_prompt("a sks man, smiling and laughing, on the beach") == "a sks man, on the beach"
    assert apg.expression_words_in("a sks man with glasses") == []


@pytest.fixture(scope="module")
def lora_sd():
    from peft import LoraConfig

    from t2i_personal.models.loading import load_components

    pipe = load_components("builtin:tiny-sd").pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    return pipe


def test_apg_runs_only_when_the_prompt_has_expression_words(lora_sd):
    cure = FreeCure(lora_sd, concepts=[("sks", "man")], attributes=[])
    plain = cure("a sks man with a hat", seed=0, num_inference_steps=4, height=SIZE, width=SIZE)
    assert not plain.apg_applied and plain.before_apg is None
    smiling = cure("a smiling sks man", seed=0, num_inference_steps=4, height=SIZE, width=SIZE)
    assert smiling.apg_applied and smiling.before_apg is not None
    assert np.asarray(smiling.images[0]).tolist() != np.asarray(smiling.before_apg[0]).tolist()
    off = FreeCure(lora_sd, concepts=[("sks", "man")], attributes=[], apg=False)
    assert not off("a smiling sks man", seed=0, num_inference_steps=4, height=SIZE, width=SIZE).apg_applied


@pytest.mark.parametrize("name", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_inversion_then_regeneration_reproduces_the_input_at_small_gamma(name):
    from t2i_personal.models.loading import load_components

    pipe = load_components(name).pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompt = ["a dog on the beach"]
    latents = pipe(prompt, num_inference_steps=20, guidance_scale=1.0, height=SIZE, width=SIZE,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    small = apg.invert_and_regenerate(pipe, latents, prompt, prompt, gamma=0.1, steps=20, guidance=1.0,
                                      height=SIZE, width=SIZE)
    large = apg.invert_and_regenerate(pipe, latents, prompt, ["a cat in the snow"], gamma=0.8, steps=20,
                                      guidance=4.0, height=SIZE, width=SIZE)
    scale = latents.abs().mean()
    assert (small - latents).abs().mean() < 0.05 * scale
    assert (large - latents).abs().mean() > 4 * (small - latents).abs().mean()
    assert torch.equal(apg.invert_and_regenerate(pipe, latents, prompt, prompt, gamma=0.0, steps=20, guidance=1.0,
                                                 height=SIZE, width=SIZE), latents)


# ----------------------------------------------------------------------------------------- foundations by kind


@pytest.fixture(scope="module")
def results(concept_dir, tmp_path_factory):
    """A full fine-tune, a Custom Diffusion result and a v-prediction LoRA (on the epsilon base) on builtin:tiny-sd,
    2 steps each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("freecure-results")
    run_training(base_config(concept_dir, root / "full", training={"max_train_steps": 2}, export={}))
    run_training(base_config(concept_dir, root / "cd", method={"name": "custom_diffusion"},
                             training={"max_train_steps": 2, "learning_rate": 1e-2}, export={}))
    run_training(base_config(concept_dir, root / "vpred", method={"name": "dreambooth", "adapter": "lora"},
                             training={"max_train_steps": 2, "prediction_type": "v_prediction"}, export={}))
    torch.set_num_threads(threads)
    return root


def test_full_fine_tune_gets_its_recorded_base_as_foundation(results):
    from t2i_personal import load_personalized
    from t2i_personal.models.loading import load_components

    pipe = load_personalized(results / "full")
    cure = FreeCure(pipe)
    assert cure.concepts == [("sks", "dog")]
    assert cure.foundation.pipe.unet is not pipe.unet
    out = cure("a sks dog wearing a red hat", seed=0, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    base = load_components("builtin:tiny-sd").pipeline()
    base.set_progress_bar_config(disable=True)
    expected = base("a dog wearing a red hat", generator=torch.Generator().manual_seed(0),
                    num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np").images[0]
    got = np.asarray(out.foundation_images[0], np.float64) / 255
    assert np.abs(got - expected).max() <= 1.5 / 255


def test_custom_diffusion_foundation_sets_its_processors_aside_and_restores_them(results):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from t2i_personal import load_personalized

    pipe = load_personalized(results / "cd")
    pipe.set_progress_bar_config(disable=True)
    before = dict(pipe.unet.attn_processors)
    assert any(type(p).__name__.startswith("CustomDiffusion") for p in before.values())
    cure = FreeCure(pipe)
    assert cure.foundation.pipe is pipe
    kinds = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda *_: kinds.append({type(p).__name__ for k, p in pipe.unet.attn_processors.items() if "attn2" in k}))
    try:
        cure("a sks dog wearing a red hat", seed=0, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    finally:
        hook.remove()
    assert kinds[0] <= {"AttnProcessor2_0", "CrossAttentionRecorder"} and "AttnProcessor2_0" in kinds[0]
    assert kinds[-1] == {"CustomDiffusionAttnProcessor2_0"}
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())
    assert not isinstance(before[next(k for k in before if "attn2" in k)], AttnProcessor2_0)


# --------------------------------------------------------------------------------------------- CLI, evaluator


def test_cli_writes_the_panel_and_record(results, tmp_path, capsys):
    from t2i_personal.freecure.__main__ import main

    out = tmp_path / "fc"
    code = main(["--model", str(results / "full"), "--prompt", "a sks dog wearing a red hat", "--steps", "2",
                 "--height", "32", "--width", "32", "--device", "cpu", "--compare", "--cache-device", "cpu",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for name in ("repaired.png", "foundation.png", "mask.png", "masks/hat.png", "personalized.png", "panel.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "freecure.json").read_text())
    assert record["foundation_prompt"] == "a dog wearing a red hat" and record["mask_sources"] == {
        "hat": "cross_attention"}
    assert Image.open(out / "panel.png").width == 4 * 192  # foundation | mask | personalized | repaired, 6x each
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["--model", str(results / "full"), "--prompt", "a sks dog", "--steps", "2", "--height", "32",
                 "--width", "32", "--mask-source", str(tmp_path / "mask.png"), "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "freecure.json").read_text())["mask_sources"] == {"mask": "user"}
    assert main(["--model", str(results / "full"), "--prompt", "a sks dog", "--steps", "0"]) == 2
    assert main(["--model", str(results / "full"), "--prompt", "a sks dog", "--height", "30", "--out",
                 str(tmp_path / "odd")]) == 2
    assert main(["--model", str(results / "full"), "--prompt", "a sks dog", "--mask-source", "nowhere.png",
                 "--out", str(out)]) == 2
    assert "nowhere.png" in capsys.readouterr().err


def test_evaluate_scores_with_and_without_freecure_side_by_side(results, tmp_path):
    import csv

    from t2i_personal.evaluation import EvalConfig, GenerationOptions, MetricOptions, evaluate
    from t2i_personal.freecure import FreeCureOptions

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {V} {C} wearing a red hat\na {V} {C} on the beach\n")
    cfg = EvalConfig(models=[str(results / "full")], prompts=str(prompts), images_per_prompt=1, seed=0,
                     metrics="clip_t", out=str(tmp_path / "eval"), freecure=True,
                     generation=GenerationOptions(steps=2, guidance=2.0, device="cpu", height=32, width=32,
                                                  freecure=FreeCureOptions(attributes="hat")),
                     metric_options=MetricOptions(clip_model="builtin:toy-clip", batch_size=4), progress=False)
    summary = evaluate(cfg)
    assert set(summary["models"]) == {"full", "full+freecure"}
    with open(tmp_path / "eval" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["model"] for r in rows) == ["full", "full", "full+freecure", "full+freecure"]
    hat = [np.asarray(Image.open(tmp_path / "eval" / m / "000-a-sks-dog-wearing-a-red-hat" / "0.png"), float)
           for m in ("full", "full+freecure")]
    beach = [np.asarray(Image.open(tmp_path / "eval" / m / "001-a-sks-dog-on-the-beach" / "0.png"), float)
             for m in ("full", "full+freecure")]
    assert np.abs(hat[0] - hat[1]).mean() > 0  # repaired where the prompt names the attribute
    assert np.abs(beach[0] - beach[1]).max() <= 1  # nothing to repair: the plain image
    record = json.loads((tmp_path / "eval" / "full+freecure" / "generation.json").read_text())
    assert record["freecure"] == {"attributes": "hat"}


def test_auto_masks_fall_back_to_cross_attention_without_a_face_parser(lora_sd):
    cure = FreeCure(lora_sd, concepts=[("sks", "man")], face_parser="no-such/face-parser")
    with pytest.warns(UserWarning, match="no face parser"):
        out = cure("a sks man with glasses", seed=0, num_inference_steps=2, height=SIZE, width=SIZE)
    assert out.mask_sources == {"glasses": "cross_attention"}
    strict = FreeCure(lora_sd, concepts=[("sks", "man")], face_parser="no-such/face-parser",
                      mask_source="face_parsing")
    with pytest.raises(ModelLoadError, match="no-such/face-parser"):
        strict("a sks man with glasses", seed=0, num_inference_steps=2, height=SIZE, width=SIZE)


def test_fasa_brings_the_foundations_picture_on_the_toy_model():
    """The mechanism on a trained model: same model on both sides, black hair asked of the "personalized" pass,
    blonde of the foundation; with the whole image as mask, FASA's result lies clearly closer to the foundation's
    picture than the plain generation does."""
    from t2i_personal.models.loading import load_components

    pipe = load_components("builtin:toy").pipeline()
    pipe.set_progress_bar_config(disable=True)
    cure = FreeCure(pipe, foundation=pipe, mask_source=np.ones((64, 64)), apg=False)
    for seed in (0, 1):
        out = cure("a photo of a person with short black hair", seed=seed, num_inference_steps=20,
                   foundation_prompt="a photo of a person with short blonde hair", guidance_scale=5, compare=True)
        plain, found, cured = (np.asarray(im, np.float64) for im in
                               (out.personalized_images[0], out.foundation_images[0], out.images[0]))
        assert np.abs(cured - found).mean() < 0.7 * np.abs(plain - found).mean()


def test_face_parsing_source_keeps_face_parts_and_refuses_others_before_sampling(lora_sd):
    cure = FreeCure(lora_sd, concepts=[("sks", "man")], face_parser="builtin:toy-face-parser",
                    mask_source="face_parsing")
    with pytest.warns(UserWarning, match="scarf are not face parts"):
        out = cure("a sks man with glasses and a scarf", seed=0, num_inference_steps=2, height=SIZE, width=SIZE)
    assert out.mask_sources == {"glasses": "face_parsing"}
    calls = []
    hook = lora_sd.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ConfigError, match="not a face part"):
            cure("a sks man with a scarf", attributes=["scarf"], seed=0, num_inference_steps=2)
    finally:
        hook.remove()
    assert calls == []  # refused before any sampling


def test_fp16_vae_with_force_upcast_decodes_in_float32(monkeypatch):
    from t2i_personal.inference.sampling import decode_latents
    from t2i_personal.models.loading import load_components

    pipe = load_components("builtin:tiny-sdxl").pipeline()
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    seen = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **kw: (seen.append(z.dtype), decode(z, **kw))[1])
    images = decode_latents(pipe, torch.randn(1, 4, 8, 8))
    assert seen == [torch.float32] and next(pipe.vae.parameters()).dtype == torch.float16
    assert images[0].size == (32, 32)


def test_foundation_keeps_the_base_parameterisation(results):
    from t2i_personal import load_personalized

    pipe = load_personalized(results / "vpred")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    cure = FreeCure(pipe)
    with cure.foundation.active() as base:
        assert base.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_evaluator_checks_freecure_options_before_generating(results, tmp_path):
    from t2i_personal.evaluation import EvalConfig, GenerationOptions, evaluate
    from t2i_personal.freecure import FreeCureOptions

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {V} {C} wearing a red hat\n")
    cfg = EvalConfig(models=[str(results / "full")], prompts=str(prompts), images_per_prompt=1, metrics="clip_t",
                     out=str(tmp_path / "eval"), freecure=True, progress=False,
                     generation=GenerationOptions(steps=1, device="cpu", freecure=FreeCureOptions(mask_source="nowhere.png")))
    with pytest.raises(ConfigError, match="nowhere.png"):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "full+freecure").exists()


def test_same_named_models_pair_with_their_freecure_twins(results, tmp_path):
    import shutil

    from t2i_personal.evaluation import EvalConfig, GenerationOptions
    from t2i_personal.evaluation import prepare

    other = tmp_path / "elsewhere" / "full"
    shutil.copytree(results / "full", other)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {V} {C} wearing a red hat\n")
    cfg = EvalConfig(models=[str(results / "full"), str(other)], prompts=str(prompts), metrics="clip_t",
                     freecure=True, generation=GenerationOptions(device="cpu"))
    sources, _, _ = prepare(cfg)
    assert [s.name for s in sources] == ["full", "full+freecure", "full-1", "full-1+freecure"]
    assert [s.freecure for s in sources] == [False, True, False, True]


def test_apg_uses_the_generations_clip_skip_and_attention_kwargs(monkeypatch):
    from peft import LoraConfig

    from t2i_personal.models.loading import load_components

    # SDXL: the tiny SD-1 text encoder (transformers 5) has no .text_model, which diffusers' SD-1 clip_skip reads
    pipe = load_components("builtin:tiny-sdxl").pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    skips, attention = [], []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt",
                        lambda *a, **kw: (skips.append(kw.get("clip_skip")), encode(*a, **kw))[1])
    hook = pipe.unet.register_forward_pre_hook(
        lambda _m, _a, kw: attention.append(kw.get("cross_attention_kwargs")), with_kwargs=True)
    try:
        out = FreeCure(pipe, concepts=[("sks", "man")], attributes=[])(
            "a smiling sks man", seed=0, num_inference_steps=4, height=SIZE, width=SIZE, clip_skip=1,
            cross_attention_kwargs={"scale": 0.5})
    finally:
        hook.remove()
    assert out.apg_applied and skips and set(skips) == {1}
    assert attention and all(kw == {"scale": 0.5} for kw in attention)  # the pipeline's calls and APG's alike


def test_cache_on_another_device_gives_the_same_images(lora_sd):
    from t2i_personal.freecure.fasa import FasaState

    default = FreeCure(lora_sd, concepts=[("sks", "dog")], omega=3.0)
    offloaded = FreeCure(lora_sd, concepts=[("sks", "dog")], omega=3.0, cache_device="cpu")
    a = default("a sks dog wearing a red hat", seed=0, num_inference_steps=3, height=SIZE, width=SIZE)
    b = offloaded("a sks dog wearing a red hat", seed=0, num_inference_steps=3, height=SIZE, width=SIZE)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert FasaState(omega=1.0, batch=1, cache_device="cpu").cache_device == "cpu"
