"""Prompts that must be refused (or warned about) before anything expensive: oversized prompt files and lines,
unmatched braces in templates, prompts over the text encoder's window, and FreeCure's omega and prompt checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from t2i_personal.data.captions import prompt_for_image, render_for_concepts, render_prompt
from t2i_personal.data.prompts import MAX_PROMPT_CHARS, MAX_PROMPT_FILE_BYTES, load_prompt_set
from t2i_personal.errors import ConfigError

DOG = {"identifier": "sks", "class_noun": "dog"}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------------- sizes


def test_an_oversized_prompt_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = _write(tmp_path, "huge.txt", "a {V} {C} " + "x" * 10_000_000 + "\n")  # the 10 MB line

    def no_reading(self):
        raise AssertionError(f"{self} was read")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    with pytest.raises(ConfigError) as ei:
        load_prompt_set(path, DOG)
    msg = str(ei.value)
    assert str(path) in msg and f"{MAX_PROMPT_FILE_BYTES:,}" in msg and "Split" in msg


def test_a_prompt_over_the_character_limit_names_file_and_line(tmp_path):
    long = "a {V} {C} on the beach " + "very " * (MAX_PROMPT_CHARS // 5)
    path = _write(tmp_path, "long.txt", "a {V} {C} in the snow\n\n" + long + "\n")
    with pytest.raises(ConfigError) as ei:
        load_prompt_set(path, DOG)
    msg = str(ei.value)
    assert f"{path}:3" in msg and f"{MAX_PROMPT_CHARS:,}" in msg and "Shorten" in msg
    yaml_path = _write(tmp_path, "long.yaml", f"- a {{V}} {{C}}\n- prompt: a {{V}} {{C}}\n  scene: {long}\n")
    with pytest.raises(ConfigError, match=rf"{yaml_path}:2: the scene is"):
        load_prompt_set(yaml_path, DOG)


# ------------------------------------------------------------------------------------------------- braces


@pytest.mark.parametrize("template", ["a photo of {V} {C on the beach", "a {V} {C}} on the beach",
                                      "{{V}} {C} on the beach", "a {V} {C} on the beach }", "a {V{C}"])
def test_an_unmatched_brace_in_a_prompt_file_is_refused(tmp_path, template):
    path = _write(tmp_path, "braces.txt", f"a {{V}} {{C}}\n{template}\n")
    with pytest.raises(ConfigError) as ei:
        load_prompt_set(path, DOG)
    msg = str(ei.value)
    assert f"{path}:2" in msg and repr(template) in msg and "unmatched" in msg and "{V1}/{C1}" in msg


def test_the_renderer_refuses_an_unmatched_brace_in_captions_and_validation_prompts(tmp_path):
    with pytest.raises(ConfigError, match=r"unmatched '\{' at '\{C on the be'.*\{V\} \(identifier\)"):
        render_prompt("a photo of {V} {C on the beach", "sks", "dog")
    with pytest.raises(ConfigError, match=r"unmatched '\}'"):
        render_prompt("a photo of {V} C}", "sks", "dog")
    concepts = [SimpleNamespace(identifier="sks", class_noun="dog"), SimpleNamespace(identifier="zwx", class_noun="cat")]
    with pytest.raises(ConfigError, match=r"\{V2\}"):  # the message lists the numbered placeholders it accepts
        render_for_concepts("{V1} {C1} and {V2} {C2 on the beach", concepts)
    image = tmp_path / "img.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "img.txt").write_text("a {V} {C wearing a hat\n")
    with pytest.raises(ConfigError, match=r"img\.txt.*unmatched"):
        prompt_for_image(image, "a photo of {V} {C}", "sks", "dog")


# ---------------------------------------------------------------------------------------------- evaluator

RECORD = {"format_version": 1, "method": "dreambooth", "artifact": {"type": "lora", "path": "lora.safetensors"},
          "base_model": {"pretrained": "builtin:tiny-sd"}, "concepts": [DOG], "config": {"data": {"resolution": 32}}}


@pytest.fixture(scope="module")
def tiny_sd():
    from t2i_personal.models.loading import load_components

    pipe = load_components("builtin:tiny-sd").pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def result(tmp_path) -> Path:
    """A result folder whose record the evaluator reads; its model is never loaded (tests stub the loader)."""
    folder = tmp_path / "my-dog"
    folder.mkdir()
    (folder / "personalization.json").write_text(json.dumps(RECORD))
    return folder


class _Drawing:
    """Stands in for the loaded pipeline: the real tokenizer, and a record of every image asked for."""

    def __init__(self, tokenizer):
        self.tokenizer, self.drawn = tokenizer, []

    def __call__(self, prompt, **_kwargs):
        self.drawn.append(prompt)
        return SimpleNamespace(images=[Image.new("RGB", (32, 32))])


def _eval_config(result: Path, prompts: Path, out: Path, **kw):
    from t2i_personal.evaluation import EvalConfig, GenerationOptions

    return EvalConfig(models=[str(result)], prompts=str(prompts), images_per_prompt=1, metrics="clip_t",
                      out=str(out), progress=False, **kw,
                      generation=GenerationOptions(steps=1, device="cpu", height=32, width=32))


def test_evaluator_refuses_overlong_prompts_before_drawing_anything(tiny_sd, result, tmp_path, monkeypatch):
    from t2i_personal.evaluation import evaluate

    drawing = _Drawing(tiny_sd.tokenizer)
    monkeypatch.setattr("t2i_personal.inference.pipeline.load_personalized", lambda *a, **k: drawing)
    over_window = _write(tmp_path, "p.txt", "a {V} {C} in the snow\na {V} {C}" + " on the beach" * 30 + "\n")
    with pytest.raises(ConfigError) as ei:
        evaluate(_eval_config(result, over_window, tmp_path / "eval"))
    msg = str(ei.value)
    assert f"{over_window}:2" in msg and "tokens long" in msg and "at most 77" in msg
    over_limit = _write(tmp_path, "q.txt", "a {V} {C} in the snow\na {V} {C} " + "x" * MAX_PROMPT_CHARS + "\n")
    with pytest.raises(ConfigError, match=rf"{over_limit}:2: the prompt is"):
        evaluate(_eval_config(result, over_limit, tmp_path / "eval2"))
    assert drawing.drawn == [] and not list(tmp_path.rglob("*.png"))


def test_evaluator_refuses_a_negative_freecure_omega_before_generating(result, tmp_path):
    from t2i_personal.evaluation import prepare
    from t2i_personal.freecure import FreeCureOptions

    cfg = _eval_config(result, _write(tmp_path, "p.txt", "a {V} {C} wearing a red hat\n"), tmp_path / "eval",
                       freecure=True)
    cfg.generation.freecure = FreeCureOptions(omega=-0.5)
    with pytest.raises(ConfigError, match=r"omega must be a finite number >= 0, not -0\.5"):
        prepare(cfg)


# ------------------------------------------------------------------------------------------------ FreeCure


class _Sampled(Exception):
    pass


@pytest.fixture
def cure(tiny_sd):
    """FreeCure on the tiny pipeline (itself as the foundation); any UNet call raises :class:`_Sampled`."""
    from t2i_personal.freecure import FreeCure

    def refuse(*_args):
        raise _Sampled

    hook = tiny_sd.unet.register_forward_pre_hook(refuse)
    yield FreeCure(tiny_sd, foundation=tiny_sd, concepts=[("sks", "dog")])
    hook.remove()


def test_freecure_refuses_a_negative_omega(tiny_sd):
    from t2i_personal.freecure import FreeCure
    from t2i_personal.freecure import FreeCureOptions

    with pytest.raises(ConfigError, match=r">= 0, not -1.*weakens the repair"):
        FreeCure(tiny_sd, foundation=tiny_sd, omega=-1)
    with pytest.raises(ConfigError, match="omega"):
        FreeCureOptions(omega=-0.01).check()
    assert FreeCure(tiny_sd, foundation=tiny_sd, omega=0).omega == 0.0  # equal weight: still a repair


@pytest.mark.parametrize("prompt", ["", "   ", ["a sks dog", ""], []])
def test_freecure_refuses_an_empty_prompt_before_sampling(cure, prompt):
    with pytest.raises(ConfigError, match="prompt"):
        cure(prompt, seed=0, num_inference_steps=1, height=32, width=32)


def test_freecure_warns_before_sampling_when_the_prompt_names_no_identifier(cure):
    with pytest.warns(UserWarning, match=r"'a dog wearing a red hat' names none of the identifiers \(sks\)"):
        with pytest.raises(_Sampled):  # the warning comes first, then generation goes on
            cure("a dog wearing a red hat", seed=0, num_inference_steps=1, height=32, width=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(_Sampled):
            cure("a sks dog, wearing a red hat", seed=0, num_inference_steps=1, height=32, width=32)


@pytest.mark.parametrize("args, expected", [(["--prompt", "  "], "FreeCure needs a prompt"),
                                            (["--prompt", "a sks dog", "--omega", "-1"], "omega must be")])
def test_freecure_cli_checks_prompt_and_omega_before_loading_the_model(tmp_path, capsys, args, expected):
    from t2i_personal.freecure.__main__ import main

    assert main(["--model", str(tmp_path / "not-loaded"), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "not-loaded" not in err
