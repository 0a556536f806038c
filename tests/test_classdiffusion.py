"""ClassDiffusion's semantic preservation loss (``method.spl``): its value is the paper's 1 - cos between the
personal and the class phrase, its gradient reaches only the learned token rows, the two poolings read the
positions they claim, lambda scales it, concepts are averaged, and it composes with prior preservation."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from conftest import base_config, run_training
from t2i_personal.config import ConceptConfig, SPLConfig, load_config, method_config
from t2i_personal.errors import ConfigError
from t2i_personal.methods import build_method
from t2i_personal.methods.classdiffusion import SemanticPreservationLoss
from t2i_personal.methods.tokens import NewTokenEmbedding
from t2i_personal.models.loading import load_components

CONCEPTS = [ConceptConfig(identifier="<new1>", initializer_token="dog", class_noun="dog", instance_dir="unused"),
            ConceptConfig(identifier="<new2>", initializer_token="cat", class_noun="cat", instance_dir="unused")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spl(concepts=CONCEPTS[:1], **config) -> SemanticPreservationLoss:
    return SemanticPreservationLoss(SPLConfig(**config), concepts)


def prepared(model="tiny-sd", concepts=CONCEPTS, **method):
    """Components with the learned tokens added, frozen and made trainable as the trainer does it."""
    components = load_components(f"builtin:{model}")
    m = build_method(method_config(spl=SPLConfig(), **method), concepts)
    m.add_tokens(components)
    m.prepare(components)
    with torch.no_grad():  # move the rows off their initializers so the two concepts' rows differ clearly
        for encoder in components.text_encoders:
            emb = encoder.get_input_embeddings()
            emb.new.add_(torch.randn(emb.new.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    return components, m


def eos_feature(encoder, tokenizer, phrase):
    ids = tokenizer(phrase, return_tensors="pt").input_ids
    position = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    assert position == ids.shape[1] - 1  # unpadded: the EOS is the last token
    return encoder(ids).last_hidden_state[0, position]


def test_loss_is_one_minus_cosine_of_the_eos_features():
    components, _ = prepared()
    loss = spl(CONCEPTS[:1])
    assert loss.pairs == [("a photo of a <new1> dog", "a photo of a dog")]
    enc, tok = components.text_encoder, components.tokenizer
    with torch.no_grad():
        expected = 1 - torch.nn.functional.cosine_similarity(eos_feature(enc, tok, "a photo of a <new1> dog"),
                                                             eos_feature(enc, tok, "a photo of a dog"), dim=0)
        value = loss(components, [enc])
    assert value.ndim == 0 and value > 1e-4
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


def test_loss_is_zero_for_identical_phrases():
    components, _ = prepared()
    loss = spl(CONCEPTS[:1], templates=["a photo of a {V} {C}", "a {V} {C} on the beach"])
    enc, tok = components.text_encoder, components.tokenizer
    with torch.no_grad():
        personal = [p for p, _ in loss.pairs]
        features = loss.features(enc, tok, personal)
        assert features.shape == (2, enc.config.hidden_size)
        torch.testing.assert_close(features, loss.features(enc, tok, personal), rtol=0, atol=0)
        assert loss(components, [enc]) > 1e-4
        loss.pairs = [(p, p) for p in personal]  # the class phrase equal to the personal one
        assert abs(float(loss(components, [enc]))) < 1e-6


def test_gradient_reaches_only_the_new_token_rows():
    components, method = prepared()  # full UNet trains too (method.train_unet default)
    assert any(p.requires_grad for p in components.unet.parameters())
    enc = components.text_encoder
    emb = enc.get_input_embeddings()
    assert isinstance(emb, NewTokenEmbedding)
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == [n for n, _ in enc.named_parameters()
                                                                         if n.endswith("token_embedding.new")]
    spl(CONCEPTS[:1])(components, [enc]).backward()  # concept 0 only
    assert all(p.grad is None for p in components.unet.parameters()), "SPL must never reach the UNet"
    assert all(p.grad is None for n, p in enc.named_parameters() if not n.endswith("token_embedding.new"))
    assert emb.table.weight.grad is None
    assert emb.new.grad[0].abs().sum() > 0, "the concept's own row gets the gradient"
    assert torch.equal(emb.new.grad[1], torch.zeros_like(emb.new.grad[1])), "the other concept's row gets none"

    # Through the trainer's path (Method.loss_terms uses the encoders that train)
    emb.new.grad = None
    assert method.trained == ["unet", "text_encoder"]
    value = method.spl(components, [getattr(components, n) for n in method.trained if n.startswith("text_encoder")])
    value.backward()
    assert (emb.new.grad.abs().sum(dim=1) > 0).all()  # both concepts of the method's SPL


def legacy_encoder(encoder) -> CLIPTextModel:
    """The same weights under an SD-1.5 style config whose eos_token_id is the legacy value 2."""
    legacy = CLIPTextModel(CLIPTextConfig(**{**encoder.config.to_dict(), "eos_token_id": 2}))
    legacy.load_state_dict(encoder.state_dict())
    return legacy.eval()


def test_argmax_id_pools_the_new_token_on_legacy_configs_and_eos_pools_the_eos():
    components = load_components("builtin:tiny-sd")
    components.text_encoder = legacy_encoder(components.text_encoder)
    assert components.text_encoder.config.eos_token_id == 2
    build_method(method_config(spl=SPLConfig()), CONCEPTS[:1]).add_tokens(components)
    enc, tok = components.text_encoder, components.tokenizer
    phrase = "a photo of a <new1> dog"
    ids = tok(phrase, return_tensors="pt").input_ids[0]
    new_id = tok.convert_tokens_to_ids("<new1>")
    assert new_id == int(ids.max()) > tok.eos_token_id  # the new token has the largest id
    new_pos, eos_pos = int((ids == new_id).nonzero()[0]), int((ids == tok.eos_token_id).nonzero()[0])
    assert new_pos != eos_pos
    with torch.no_grad():
        hidden = enc(ids[None]).last_hidden_state[0]
        argmax = spl(pooling="argmax_id").features(enc, tok, [phrase])[0]
        eos = spl(pooling="eos").features(enc, tok, [phrase])[0]
    assert torch.equal(argmax, hidden[new_pos])
    assert torch.equal(eos, hidden[eos_pos])
    assert not torch.allclose(argmax, eos)

    # With the corrected config (eos_token_id = the real EOS id) the model's own pooler reads the EOS too.
    components = load_components("builtin:tiny-sd")
    assert components.text_encoder.config.eos_token_id == tok.eos_token_id
    build_method(method_config(spl=SPLConfig()), CONCEPTS[:1]).add_tokens(components)
    with torch.no_grad():
        argmax = spl(pooling="argmax_id").features(components.text_encoder, components.tokenizer, [phrase])
        eos = spl(pooling="eos").features(components.text_encoder, components.tokenizer, [phrase])
    torch.testing.assert_close(argmax, eos, rtol=0, atol=0)


def test_lambda_scales_the_loss_linearly():
    components, _ = prepared()
    with torch.no_grad():
        values = {w: float(spl(CONCEPTS[:1], weight=w)(components, [components.text_encoder])) for w in (0.0, 1.0, 2.5)}
    assert values[1.0] > 1e-4 and values[0.0] == 0.0
    assert values[2.5] == pytest.approx(2.5 * values[1.0], rel=1e-6)


def test_several_concepts_are_averaged():
    components, _ = prepared()
    encoders = [components.text_encoder]
    with torch.no_grad():
        both = spl(CONCEPTS)(components, encoders)
        one, two = spl(CONCEPTS[:1])(components, encoders), spl(CONCEPTS[1:])(components, encoders)
    assert abs(float(one - two)) > 1e-5  # not trivially equal
    torch.testing.assert_close(both, (one + two) / 2, rtol=1e-5, atol=1e-7)


def test_sdxl_averages_over_the_encoders_that_train():
    components, _ = prepared("tiny-sdxl", CONCEPTS[:1])
    loss = spl(CONCEPTS[:1])
    with torch.no_grad():
        both = loss(components, components.text_encoders)
        first, second = loss(components, [components.text_encoder]), loss(components, [components.text_encoder_2])
    torch.testing.assert_close(both, (first + second) / 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="pooling: eos"):
        spl(CONCEPTS[:1], pooling="argmax_id").check(components)


def test_config_rejects_spl_when_nothing_on_the_text_side_trains(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "spl": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="method.spl acts on the text side only"):
        load_config(base=cfg)
    cfg["method"]["train_text_encoder"] = True
    assert load_config(base=cfg).method.spl.weight == 1.0
    cfg["method"]["train_text_encoder"] = False
    cfg["concepts"] = [{"identifier": "<new1>", "initializer_token": "dog", "class_noun": "dog",
                        "instance_dir": str(concept_dir)}]
    assert load_config(base=cfg).method.spl is not None
    with pytest.raises(ConfigError, match="templates"):
        load_config(base={**cfg, "method": {"name": "dreambooth", "spl": {"templates": ["a photo of {C}"]}}})


def token_concept(concept_dir, **extra) -> list[dict]:
    return [{"identifier": "<new1>", "initializer_token": "dog", "class_noun": "dog", "instance_dir": str(concept_dir),
             **extra}]


def test_tokens_only_run_with_spl_changes_only_the_token_row(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "train_unet": False,
                                                             "spl": {"weight": 2.0}},
                      concepts=token_concept(concept_dir), training={"learning_rate": 0.1})
    trainer = run_training(cfg)
    assert set(trainer.last_logs) >= {"denoise", "spl"} and trainer.last_logs["spl"] > 0
    base, tuned = load_components("builtin:tiny-sd"), trainer.components
    old = base.text_encoder.state_dict()
    new = {k.replace("token_embedding.table.", "token_embedding."): v for k, v in tuned.text_encoder.state_dict().items()
           if not k.endswith("token_embedding.new")}
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in tuned.unet.state_dict().items())
    assert not torch.equal(tuned.text_encoder.get_input_embeddings().new[0].detach(), old[
        next(k for k in old if k.endswith("token_embedding.weight"))][1929])


def test_spl_with_prior_preservation_trains_and_logs_both_terms(concept_dir, tmp_path):
    from t2i_personal.data.examples import write_examples

    class_dir = tmp_path / "class"
    write_examples(class_dir, count=2, size=48)
    cfg = base_config(concept_dir, tmp_path / "out",
                      method={"name": "dreambooth", "prior": "class_images", "train_unet": False, "spl": {}},
                      concepts=token_concept(concept_dir, class_dir=str(class_dir), num_class_images=2),
                      training={"learning_rate": 0.1, "train_batch_size": 1})
    trainer = run_training(cfg)
    logs = trainer.last_logs
    assert {"denoise", "prior", "spl"} <= set(logs)
    assert all(logs[k] > 0 for k in ("denoise", "prior", "spl"))
    assert logs["loss"] == pytest.approx(logs["denoise"] + logs["prior"] + logs["spl"], rel=1e-6)
    assert len(list(class_dir.iterdir())) == 2, "enough class images were given: none generated"
    assert (tmp_path / "out" / "personalization.json").is_file()


def test_spl_keeps_the_personal_phrase_near_its_class(concept_dir, tmp_path):
    """What SPL is for: after the same training, the personal phrase has drifted less from the class phrase."""
    distances = {}
    for weight in (0.0, 5.0):
        cfg = base_config(concept_dir, tmp_path / f"out-{weight}",
                          method={"name": "dreambooth", "train_unet": False, "spl": {"weight": weight}},
                          concepts=token_concept(concept_dir), training={"learning_rate": 0.05, "max_train_steps": 12})
        trainer = run_training(cfg)
        with torch.no_grad():
            distances[weight] = spl()(trainer.components, trainer.components.text_encoders).item()
    assert distances[5.0] < 0.5 * distances[0.0], distances
