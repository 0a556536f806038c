"""Tests for t2i_personal.data.captions."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i_personal.data.captions import (
    caption_path_for,
    prompt_for_image,
    read_caption,
    render_prompt,
)


def test_render_prompt_basic():
    assert render_prompt("a photo of {V} {C}", "sks", "dog") == "a photo of sks dog"
    assert render_prompt("{C}, {V} {C}", "sks", "dog") == "dog, sks dog"
    assert render_prompt("plain prompt", "sks", "dog") == "plain prompt"


def test_render_prompt_collapses_whitespace():
    assert render_prompt("  a  photo\tof\n{V}   {C}  ", "sks", "dog") == "a photo of sks dog"
    # Empty identifier must not leave a double space behind.
    assert render_prompt("a photo of {V} {C}", "", "dog") == "a photo of dog"


def test_render_prompt_no_recursive_expansion():
    assert render_prompt("{V} {C}", "x{C}", "dog") == "x{C} dog"


@pytest.mark.parametrize("bad", ["{name}", "{}", "{v}", "{ V }"])
def test_render_prompt_unknown_placeholder(bad):
    template = f"a photo of {bad} {{C}}"
    with pytest.raises(ValueError) as ei:
        render_prompt(template, "sks", "dog")
    msg = str(ei.value)
    assert repr(template) in msg
    assert bad in msg
    assert "{V}" in msg and "{C}" in msg


def test_caption_path_for(tmp_path):
    assert caption_path_for(tmp_path / "img.png") == tmp_path / "img.txt"
    assert caption_path_for("a/b.c.JPG") == Path("a/b.c.txt")
    assert isinstance(caption_path_for("x.png"), Path)


def test_read_caption_absent_and_empty(tmp_path):
    img = tmp_path / "img.png"
    assert read_caption(img) is None
    (tmp_path / "img.txt").write_text("")
    assert read_caption(img) is None
    (tmp_path / "img.txt").write_text("  \n\t\n")
    assert read_caption(img) is None


def test_read_caption_strips_and_takes_first_nonempty_line(tmp_path):
    img = tmp_path / "img.png"
    text = "\n\n  a {V} {C} on a beach  \nsecond line\n"
    (tmp_path / "img.txt").write_text(text, encoding="utf-8")
    assert read_caption(img) == "a {V} {C} on a beach"


def test_read_caption_utf8_and_bom(tmp_path):
    img = tmp_path / "img.png"
    (tmp_path / "img.txt").write_bytes("\ufeffcafé {V}".encode("utf-8"))
    assert read_caption(img) == "café {V}"


def test_read_caption_undecodable(tmp_path):
    img = tmp_path / "img.png"
    cap = tmp_path / "img.txt"
    cap.write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(ValueError) as ei:
        read_caption(img)
    assert str(cap) in str(ei.value)
    assert "UTF-8" in str(ei.value)


def test_prompt_for_image_uses_caption_or_template(tmp_path):
    img1 = tmp_path / "one.png"
    img2 = tmp_path / "two.png"
    (tmp_path / "one.txt").write_text("{V} {C}  wearing a hat\n")
    assert prompt_for_image(img1, "a photo of {V} {C}", "sks", "cat") == "sks cat wearing a hat"
    assert prompt_for_image(img2, "a photo of {V} {C}", "sks", "cat") == "a photo of sks cat"
    (tmp_path / "two.txt").write_text("")
    assert prompt_for_image(img2, "a photo of {V} {C}", "sks", "cat") == "a photo of sks cat"


def test_prompt_for_image_bad_caption_names_file(tmp_path):
    img = tmp_path / "img.png"
    cap = tmp_path / "img.txt"
    cap.write_text("a {thing}")
    with pytest.raises(ValueError) as ei:
        prompt_for_image(img, "{V} {C}", "sks", "cat")
    assert str(cap) in str(ei.value)
    assert "{thing}" in str(ei.value)


def test_prompt_for_image_bad_template(tmp_path):
    with pytest.raises(ValueError, match="unknown placeholder"):
        prompt_for_image(tmp_path / "img.png", "{X}", "sks", "cat")


def test_prompts_can_name_every_concept():
    from types import SimpleNamespace

    from t2i_personal.data.captions import render_for_concepts
    from t2i_personal.errors import ConfigError

    concepts = [SimpleNamespace(identifier="<new1>", class_noun="dog"), SimpleNamespace(identifier="zwx", class_noun="cat")]
    assert render_for_concepts("{V} {C} and {V2} {C2}, {V1}", concepts) == "<new1> dog and zwx cat, <new1>"
    with pytest.raises(ConfigError, match=r"\{V3\}"):
        render_for_concepts("{V3} on the beach", concepts)
