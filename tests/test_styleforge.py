"""StyleForge (``method.name: styleforge``, ``prior: auxiliary``): Single- and Multi-StyleForge run end to end, the
auxiliary images are used as given (never generated, never touched) under the class prompt, and ``style_prompt``
follows its three token rules."""

import hashlib
import json

import pytest
import torch

from conftest import base_config, run_training
from t2i_personal.config import load_config
from t2i_personal.data.examples import write_examples
from t2i_personal.errors import ConfigError
from t2i_personal.methods.styleforge import RULES, mentions_person, style_prompt
from t2i_personal.models.loading import load_components


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def style_concept(identifier, instance_dir, aux) -> dict:
    return {"identifier": identifier, "class_noun": "style", "instance_prompt": "a photo of {V} style",
            "class_prompt": "a photo of style", "class_dir": str(aux), "instance_dir": str(instance_dir)}


def styleforge_config(out, concepts, prior="auxiliary") -> dict:
    return base_config(None, out, concepts=concepts,
                       method={"name": "styleforge", "train_text_encoder": True, "prior": prior},
                       training={"max_train_steps": 2, "train_batch_size": 1, "learning_rate": 1e-3})


def snapshot(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def aux(tmp_path):
    folder = tmp_path / "aux"
    write_examples(folder, count=3, size=40)
    return folder


@pytest.fixture
def no_generation(monkeypatch):
    """Any attempt to generate class images fails the test."""
    import t2i_personal.training.setup as setup_module

    def refuse(*args, **kwargs):
        raise AssertionError("auxiliary images must never be generated")

    monkeypatch.setattr(setup_module, "ensure_class_images", refuse)


def check_auxiliary_prior(trainer, aux, identifiers):
    dataset = trainer.run.dataset
    aux_files = sorted(p.name for p in aux.iterdir())
    assert len(dataset.priors) == len(identifiers)
    for group in dataset.priors:  # every auxiliary image, as given, under the class prompt, for each concept
        assert sorted(e.path.name for e in group) == aux_files
        assert all(e.is_prior and e.prompt == "a photo of style" and e.path.parent == aux for e in group)
    prompts = {i: p for p, i in dataset.prompt_index.items()}
    assert set(prompts.values()) == {f"a photo of {v} style" for v in identifiers} | {"a photo of style"}
    for index in range(len(dataset)):
        instance, prior = dataset[(index, 0)]
        assert not instance["is_prior"] and prior["is_prior"]
        assert prompts[prior["prompt"]] == "a photo of style"
        assert prompts[instance["prompt"]] == f"a photo of {identifiers[index % len(identifiers)]} style"


def check_trained(trainer, out):
    logs = trainer.last_logs
    assert {"denoise", "prior"} <= set(logs) and logs["prior"] > 0
    record = json.loads((out / "personalization.json").read_text())
    assert record["method"] == "styleforge" and record["artifact"]["type"] == "pipeline"
    base, tuned = load_components("builtin:tiny-sd"), trainer.components
    for name in ("unet", "text_encoder"):  # dual binding: both the UNet and the text encoder train
        old, new = getattr(base, name).state_dict(), getattr(tuned, name).state_dict()
        assert any(not torch.equal(old[k], new[k]) for k in old), f"{name} did not train"


def test_single_styleforge_runs_on_the_auxiliary_images(concept_dir, aux, no_generation, tmp_path):
    before = snapshot(aux)
    out = tmp_path / "out"
    trainer = run_training(styleforge_config(out, [style_concept("sks", concept_dir, aux)]))
    check_trained(trainer, out)
    check_auxiliary_prior(trainer, aux, ["sks"])
    assert snapshot(aux) == before, "the auxiliary folder must be left as it is"


def test_multi_styleforge_binds_two_tokens_sharing_the_auxiliary_set(concept_dir, aux, no_generation, tmp_path):
    scenes = tmp_path / "scenes"
    write_examples(scenes, count=2, size=40)
    before = snapshot(aux)
    out = tmp_path / "out"
    trainer = run_training(styleforge_config(out, [style_concept("sks", concept_dir, aux),
                                                   style_concept("zwx", scenes, aux)]))
    check_trained(trainer, out)
    check_auxiliary_prior(trainer, aux, ["sks", "zwx"])
    assert snapshot(aux) == before


def test_auxiliary_prior_needs_a_class_dir(concept_dir, aux, tmp_path):
    concept = style_concept("sks", concept_dir, aux)
    del concept["class_dir"]
    with pytest.raises(ConfigError, match=r"have no class_dir"):
        load_config(base=styleforge_config(tmp_path / "out", [concept]))
    # also for DreamBooth with the auxiliary prior
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "prior": "auxiliary"})
    with pytest.raises(ConfigError, match=r"\['sks'\] have no class_dir"):
        load_config(base=cfg)


@pytest.mark.parametrize("prior", ["class_images", "base_prediction"])
def test_styleforge_rejects_generated_priors(prior, concept_dir, aux, tmp_path):
    with pytest.raises(ConfigError, match="styleforge"):
        load_config(base=styleforge_config(tmp_path / "out", [style_concept("sks", concept_dir, aux)], prior=prior))
    # the paper's "w/o Aux" ablation is allowed
    cfg = load_config(base=styleforge_config(tmp_path / "out", [style_concept("sks", concept_dir, aux)], prior="none"))
    assert cfg.method.name == "styleforge" and cfg.method.prior == "none"


def test_style_prompt_person_v_else_w():
    assert style_prompt("a girl", "sks", "zwx", "person_v_else_w") == "a photo of sks style, a girl"
    assert style_prompt("a river", "sks", "zwx", "person_v_else_w") == "a photo of zwx style, a river"
    assert style_prompt("Two WOMEN at a market", "sks", "zwx", "person_v_else_w").startswith("a photo of sks style")
    assert style_prompt("a mountain lake", "sks", "zwx", "person_v_else_w").startswith("a photo of zwx style")
    assert mentions_person("portrait of a king") and not mentions_person("a riverbank at dawn")


def test_style_prompt_v_and_w_and_always_v():
    for content in ("a girl", "a river"):
        assert style_prompt(content, "sks", "zwx", "v_and_w") == f"a photo of sks zwx style, {content}"
        assert style_prompt(content, "sks", rule="always_v") == f"a photo of sks style, {content}"
        assert style_prompt(content, "sks", "zwx") == f"a photo of sks style, {content}"  # always_v is the default
    assert style_prompt("", "sks") == "a photo of sks style"
    assert set(RULES) == {"always_v", "person_v_else_w", "v_and_w"}


def test_style_prompt_rejects_unknown_rules_and_a_missing_w():
    with pytest.raises(ValueError, match="unknown StyleForge token rule 'sometimes'"):
        style_prompt("a girl", "sks", "zwx", "sometimes")
    for rule in ("person_v_else_w", "v_and_w"):
        with pytest.raises(ValueError, match=f"rule '{rule}' needs the background token"):
            style_prompt("a river", "sks", None, rule)
