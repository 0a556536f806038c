"""Tests for t2i_personal.data.prompts: DreamBench's built-in prompts, prompt files, multi-concept prompts, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i_personal.config import ConceptConfig
from t2i_personal.data.prompts import (
    BUILTIN_PROMPT_SETS,
    PROMPT_SETS_DIR,
    Prompt,
    dreambench_subjects,
    is_live_class,
    load_prompt_set,
)
from t2i_personal.errors import ConfigError

DOG = ConceptConfig(identifier="sks", class_noun="dog", instance_dir="unused")
APPLE = {"identifier": "zwx", "class_noun": "apple", "instance_prompt": "a photo of {V} {C}"}  # personalization.json


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ DreamBench


def test_dreambench_has_25_object_and_25_live_prompts():
    objects = load_prompt_set("dreambench-objects", DOG)
    live = load_prompt_set("dreambench-live", DOG)
    assert len(objects) == 25 and len(live) == 25
    assert len({p.template for p in objects}) == 25 and len({p.template for p in live}) == 25
    # The first ten (recontextualization) are shared; then objects have 10 more scenes, live subjects accessories.
    assert [p.template for p in objects[:10]] == [p.template for p in live[:10]]
    assert objects[0].template == "a {V} {C} in the jungle"
    assert objects[12].template == "a {V} {C} with the Eiffel Tower in the background"
    assert live[13].template == "a {V} {C} wearing a black top hat and a monocle"
    assert objects[-1].template == live[-1].template == "a cube shaped {V} {C}"
    assert [p.category for p in objects].count("recontextualization") == 20
    assert [p.category for p in objects].count("property") == 5
    assert [p.category for p in live].count("accessorization") == 10
    assert all(p.source.startswith("dreambench-") for p in objects + live)


def test_dreambench_subjects_table():
    subjects = dreambench_subjects()
    assert len(subjects) == 30
    assert len({s.class_noun for s in subjects.values()}) == 15
    live = sorted(name for name, s in subjects.items() if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert subjects["bear_plushie"].class_noun == "stuffed animal"
    assert subjects["pink_sunglasses"].class_noun == "glasses"
    assert subjects["poop_emoji"].class_noun == "toy"
    # The live flag agrees with the class-based choice that "dreambench" makes.
    assert all(is_live_class(s.class_noun) == s.live for s in subjects.values())


def test_dreambench_rendering_class_prompt_and_scene():
    prompts = load_prompt_set("dreambench-live", [DOG])
    first = prompts[0]
    assert isinstance(first, Prompt)
    assert first.text == "a sks dog in the jungle"
    assert first.class_prompt == "a dog in the jungle"
    assert first.scene == "in the jungle"
    assert first.concepts == ("sks",) and first.concept_indices == (0,)
    assert prompts[6].scene == "with a city in the background"
    red = prompts[20]
    assert (red.text, red.class_prompt, red.scene) == ("a red sks dog", "a red dog", "red")
    assert prompts[24].scene == "cube shaped"
    assert all("sks" not in p.class_prompt and "{" not in p.text for p in prompts)
    assert all(p.scene and "sks" not in p.scene and "dog" not in p.scene for p in prompts)


def test_dreambench_chooses_live_or_objects_per_concept():
    prompts = load_prompt_set("dreambench", [DOG, APPLE])
    assert len(prompts) == 50
    dog, apple = prompts[:25], prompts[25:]
    assert all(p.concepts == ("sks",) and p.concept_indices == (0,) for p in dog)
    assert all(p.concepts == ("zwx",) and p.concept_indices == (1,) for p in apple)
    assert "a sks dog wearing a red hat" in [p.text for p in dog]
    assert "a zwx apple floating in an ocean of milk" in [p.text for p in apple]
    assert not any("hat" in p.text for p in apple)
    # "a {V} {C}" with a vowel class noun: the class prompt says "an apple".
    assert apple[0].class_prompt == "an apple in the jungle"


def test_single_concept_set_is_rendered_for_every_concept():
    prompts = load_prompt_set("dreambench-objects", [DOG, APPLE])
    assert len(prompts) == 50
    assert [p.text for p in prompts[:2]] == ["a sks dog in the jungle", "a zwx apple in the jungle"]


def test_is_live_class():
    assert is_live_class("dog") and is_live_class("Corgi Dog") and is_live_class("woman")
    assert not is_live_class("stuffed animal") and not is_live_class("backpack") and not is_live_class("")


def test_shipped_files_exist():
    names = sorted(p.name for p in PROMPT_SETS_DIR.iterdir())
    assert names == ["dreambench-live.yaml", "dreambench-objects.yaml", "dreambench-subjects.yaml"]
    assert "dreambench" in BUILTIN_PROMPT_SETS


# ---------------------------------------------------------------------------------------------------------- files


def test_txt_file(tmp_path):
    path = _write(
        tmp_path,
        "prompts.txt",
        "# my prompts\n\na {V} {C} on the moon\n   \n  # indented comment\nan oil painting of {V} {C}\n"
        "a photo of a beach\n",
    )
    prompts = load_prompt_set(path, DOG)
    assert [p.text for p in prompts] == ["a sks dog on the moon", "an oil painting of sks dog", "a photo of a beach"]
    assert [p.source for p in prompts] == [f"{path}:3", f"{path}:6", f"{path}:7"]
    assert prompts[1].class_prompt == "an oil painting of dog"
    assert prompts[1].scene == "an oil painting"
    # No concept mentioned: the prompt is its own class prompt and scene.
    assert prompts[2].concepts == () and prompts[2].class_prompt == prompts[2].scene == "a photo of a beach"
    # A string path works as well as a Path.
    assert load_prompt_set(str(path), DOG) == prompts


def test_txt_with_spelled_out_identifier(tmp_path):
    path = _write(tmp_path, "literal.txt", "a sks dog in the snow\nsks on a sofa\nsksx dog\n")
    first, second, third = load_prompt_set(path, DOG)
    assert first.template == "a {V1} {C1} in the snow" and first.concepts == ("sks",)
    assert (first.text, first.class_prompt, first.scene) == ("a sks dog in the snow", "a dog in the snow", "in the snow")
    assert second.class_prompt == "dog on a sofa" and second.concepts == ("sks",)
    assert third.concepts == () and third.text == "sksx dog"  # only whole words are identifiers


def test_lone_identifier_becomes_class_noun_in_class_prompt(tmp_path):
    path = _write(tmp_path, "lone.txt", "a photo of {V}\n")
    (prompt,) = load_prompt_set(path, [APPLE])
    assert prompt.text == "a photo of zwx"
    assert prompt.class_prompt == "a photo of apple"


def test_yaml_file(tmp_path):
    path = _write(
        tmp_path,
        "prompts.yaml",
        "- a {V} {C} in the snow\n"
        "- prompt: a {V} {C} wearing sunglasses, at sunset\n"
        "  scene: sunset\n"
        "  category: accessorization\n"
        "- {prompt: 'a {V} {C} on a table', concepts: [zwx]}\n",
    )
    prompts = load_prompt_set(path, [DOG, APPLE])
    assert [p.text for p in prompts] == [
        "a sks dog in the snow",
        "a zwx apple in the snow",
        "a sks dog wearing sunglasses, at sunset",
        "a zwx apple wearing sunglasses, at sunset",
        "a zwx apple on a table",
    ]
    assert prompts[2].scene == "sunset" and prompts[2].category == "accessorization"
    assert prompts[0].category is None and prompts[0].scene == "in the snow"
    assert prompts[4].concepts == ("zwx",) and prompts[4].concept_indices == (1,)
    assert prompts[4].class_prompt == "an apple on a table"
    assert [p.source for p in prompts] == [f"{path}:1", f"{path}:1", f"{path}:2", f"{path}:2", f"{path}:5"]


def test_yml_and_json_suffixes(tmp_path):
    yml = _write(tmp_path, "p.yml", "- a {V} {C}\n")
    js = _write(tmp_path, "p.json", '[{"prompt": "a {V} {C} at night"}]')
    assert load_prompt_set(yml, DOG)[0].text == "a sks dog"
    assert load_prompt_set(js, DOG)[0].text == "a sks dog at night"


# -------------------------------------------------------------------------------------------------- multi-concept


def test_multi_concept_prompts(tmp_path):
    path = _write(
        tmp_path,
        "multi.yaml",
        "- '{V1} {C1} and {V2} {C2} on the beach'\n"
        "- prompt: a {V1} {C1} playing with a {V2} {C2} in the snow\n"
        "- prompt: a {V1} {C1} next to a {V2} {C2}\n"
        "  concepts: [zwx, sks]\n",
    )
    beach, snow, swapped = load_prompt_set(path, [DOG, APPLE])
    assert beach.text == "sks dog and zwx apple on the beach"
    assert beach.class_prompt == "dog and apple on the beach"
    assert beach.scene == "on the beach"
    assert beach.concepts == ("sks", "zwx") and beach.concept_indices == (0, 1)
    assert snow.text == "a sks dog playing with a zwx apple in the snow"
    assert snow.class_prompt == "a dog playing with an apple in the snow"
    assert snow.scene == "playing in the snow"
    # The entry's concepts bind {V1} to zwx and {V2} to sks.
    assert swapped.text == "a zwx apple next to a sks dog"
    assert swapped.concepts == ("zwx", "sks") and swapped.concept_indices == (1, 0)
    assert swapped.scene is None


def test_unnumbered_placeholders_mean_first_concept_in_multi_prompt(tmp_path):
    path = _write(tmp_path, "mixed.txt", "{V} {C} with {V2} {C2}\n")
    (prompt,) = load_prompt_set(path, [DOG, APPLE])
    assert prompt.text == "sks dog with zwx apple"
    assert prompt.concepts == ("sks", "zwx")


# --------------------------------------------------------------------------------------------------------- errors


def test_unknown_builtin_suggests_nearest():
    with pytest.raises(ConfigError) as ei:
        load_prompt_set("dreambench-object", DOG)
    msg = str(ei.value)
    assert "'dreambench-object'" in msg and "Did you mean 'dreambench-objects'?" in msg
    assert all(name in msg for name in BUILTIN_PROMPT_SETS)
    with pytest.raises(ConfigError, match="Unknown prompt set 'nonsense'") as ei:
        load_prompt_set("nonsense", DOG)
    assert "Did you mean" not in str(ei.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match="does not exist") as ei:
        load_prompt_set(missing, DOG)
    assert str(missing) in str(ei.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompt_set(str(tmp_path / "nope.yaml"), DOG)


def test_unsupported_suffix(tmp_path):
    path = _write(tmp_path, "prompts.csv", "a {V} {C}\n")
    with pytest.raises(ConfigError, match="unsupported suffix '.csv'"):
        load_prompt_set(path, DOG)


@pytest.mark.parametrize(
    "name, text",
    [("empty.txt", ""), ("comments.txt", "# only\n\n  # comments\n"), ("empty.yaml", ""), ("emptylist.yaml", "[]\n")],
)
def test_empty_set(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    with pytest.raises(ConfigError, match="holds no prompts") as ei:
        load_prompt_set(path, DOG)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("bad", ["{name}", "{v}", "{V0}", "{}", "{ V }", "{X1}"])
def test_unknown_placeholder_names_file_and_line(tmp_path, bad):
    path = _write(tmp_path, "bad.txt", f"a {{V}} {{C}}\n\na {bad} on the beach\n")
    with pytest.raises(ConfigError) as ei:
        load_prompt_set(path, DOG)
    msg = str(ei.value)
    assert f"{path}:3" in msg and bad in msg and "{V1}/{C1}" in msg


def test_unknown_placeholder_in_yaml_names_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", "- a {V} {C}\n- prompt: a {V} {Cls}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: .*\{Cls\}"):
        load_prompt_set(path, DOG)


def test_concept_index_out_of_range(tmp_path):
    path = _write(tmp_path, "multi.txt", "a {V} {C}\n{V1} {C1} and {V3} {C3}\n")
    with pytest.raises(ConfigError) as ei:
        load_prompt_set(path, [DOG, APPLE])
    msg = str(ei.value)
    assert f"{path}:2" in msg and "concept 3" in msg and "only 2 concept(s)" in msg and "'sks', 'zwx'" in msg
    with pytest.raises(ConfigError, match="concept 2"):
        load_prompt_set(_write(tmp_path, "two.txt", "{V1} {C1} with {V2} {C2}\n"), DOG)


def test_yaml_unknown_identifier(tmp_path):
    path = _write(tmp_path, "p.yaml", "- prompt: a {V} {C}\n  concepts: [qqq]\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:1: .*'qqq'.*'sks', 'zwx'"):
        load_prompt_set(path, [DOG, APPLE])


def test_yaml_unknown_key_names_line_and_suggests(tmp_path):
    path = _write(tmp_path, "p.yaml", "- prompt: a {V} {C}\n- prompt: a {V} {C} at dawn\n  scen: dawn\n")
    with pytest.raises(ConfigError) as ei:
        load_prompt_set(path, DOG)
    msg = str(ei.value)
    assert f"{path}:2" in msg and "'scen'" in msg and "Did you mean 'scene'?" in msg
    assert "prompt, concepts, scene, category" in msg


@pytest.mark.parametrize(
    "text, match",
    [
        ("prompt: a {V} {C}\n", "holds a list of prompts"),
        ("- [a, b]\n", "must be a string or a mapping"),
        ("- scene: x\n", "needs a non-empty 'prompt'"),
        ("- {prompt: a, concepts: []}\n", "non-empty list of identifiers"),
        ("- {prompt: a, scene: 3}\n", "'scene' of prompt entry 1 must be a string"),
        ("- [unclosed\n", "not valid YAML"),
    ],
)
def test_yaml_malformed(tmp_path, text, match):
    path = _write(tmp_path, "p.yaml", text)
    with pytest.raises(ConfigError, match=match) as ei:
        load_prompt_set(path, DOG)
    assert str(path) in str(ei.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a {V} {C} in the caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_prompt_set(path, DOG)


@pytest.mark.parametrize("concepts", [None, [], [{"identifier": "sks"}], "sks"])
def test_bad_concepts(concepts):
    with pytest.raises(ConfigError):
        load_prompt_set("dreambench-live", concepts)
