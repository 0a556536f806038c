"""Learned tokens (textual inversion; ``concepts[].initializer_token``): only the new embedding row trains, the
saved embedding loads with diffusers' own ``load_textual_inversion`` and reproduces the tuned model exactly, alone
and combined with LoRA (pivotal tuning) or a full fine-tune; bad identifiers / initializers fail early."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config, run_training
from t2i_personal import load_personalized
from t2i_personal.config import ConceptConfig, load_config
from t2i_personal.errors import ConfigError
from t2i_personal.methods.tokens import LearnedTokens, NewTokenEmbedding

SDXL_KEYS = ("clip_l", "clip_g")  # diffusers' SDXL embedding files
from t2i_personal.models.loading import load_components

TOKEN = "<new1>"
PROMPT = f"a photo of {TOKEN} dog"
EMBEDS = "learned_embeds-0-new1.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def token_concepts(concept_dir, identifier=TOKEN, initializer="dog") -> list[dict]:
    return [{"identifier": identifier, "initializer_token": initializer, "class_noun": "dog",
             "instance_dir": str(concept_dir)}]


def token_config(concept_dir, out, model="tiny-sd", method=None, **training) -> dict:
    return base_config(concept_dir, out, model={"pretrained": f"builtin:{model}"},
                       method={"name": "dreambooth", **(method or {})}, concepts=token_concepts(concept_dir),
                       training={"learning_rate": 1e-2, "token_learning_rate": 0.5, **training})


def generate(pipe, prompt=PROMPT) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images


def load_plain(pipe, path, token=TOKEN):
    """What a diffusers user does with the saved file, following diffusers' documentation."""
    if getattr(pipe, "text_encoder_2", None) is None:
        pipe.load_textual_inversion(str(path), token=token)
    else:
        state = load_file(str(path))
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    return pipe


_RUNS = {}


@pytest.fixture(scope="module")
def tokens_only(concept_dir, tmp_path_factory):
    """A finished tokens-only run per (model, weight decay), trained once per module."""

    def get(model: str, decay: float | None):
        key = (model, decay)
        if key not in _RUNS:
            out = tmp_path_factory.mktemp(f"tokens-{model}") / "out"
            training = {} if decay is None else {"adam_weight_decay": decay}
            _RUNS[key] = (run_training(token_config(concept_dir, out, model, {"train_unet": False}, **training)), out)
        return _RUNS[key]

    yield get
    _RUNS.clear()


@pytest.mark.parametrize("model,decay", [("tiny-sd", None), ("tiny-sd", 0.1), ("tiny-sdxl", 0.1)])
def test_only_the_new_row_trains(model, decay, tokens_only):
    trainer, _ = tokens_only(model, decay)
    base, tuned = load_components(f"builtin:{model}"), trainer.components
    for name in ("text_encoder", "text_encoder_2"):
        b, a = getattr(base, name), getattr(tuned, name)
        if b is None:
            continue
        module = a.get_input_embeddings()
        assert isinstance(module, NewTokenEmbedding) and module.new.shape[0] == 1
        base_table = b.get_input_embeddings().weight
        assert torch.equal(module.table.weight, base_table), f"{name}: a row other than the new token's changed"
        assert torch.equal(module.weight[:-1], base_table)
        # The other weights of the encoder (transformer, positions, final norm) are untouched too.
        old = {k: v for k, v in b.state_dict().items()}
        new = {k.replace("token_embedding.table.", "token_embedding."): v for k, v in a.state_dict().items()
               if not k.endswith("token_embedding.new")}
        assert old.keys() == new.keys()
        assert not [k for k in old if not torch.equal(old[k], new[k])]
        init_row = base_table[tuned.tokenizers[0 if name == "text_encoder" else 1].convert_tokens_to_ids("dog</w>")]
        assert (module.new[0].detach() - init_row).abs().max() > 1e-2, f"{name}: the new token's row did not train"
    for name in ("unet", "vae"):
        old, new = getattr(base, name).state_dict(), getattr(tuned, name).state_dict()
        assert not [k for k in old if not torch.equal(old[k], new[k])], f"{name} must stay frozen"
    # The token rows form their own optimizer group at training.token_learning_rate.
    rows = {id(p) for p in LearnedTokens(trainer.config.concepts).parameters(tuned)}
    groups = [g for g in trainer.optimizer.param_groups if any(id(p) in rows for p in g["params"])]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == rows and groups[0]["lr"] == 0.5
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(rows)


def test_gradient_reaches_only_the_new_rows():
    table = torch.nn.Embedding(10, 4)
    table.weight.requires_grad_(False)
    emb = NewTokenEmbedding(table, table.weight[[3, 5]])
    assert torch.equal(emb.new.detach(), table.weight[[3, 5]])
    ids = torch.tensor([[0, 10, 2, 11, 9], [1, 1, 11, 4, 10]])
    out = emb(ids)
    assert torch.equal(out[0, 0], table.weight[0]) and torch.equal(out[0, 1], emb.new[0].detach())
    (out * torch.randn_like(out)).sum().backward()
    assert table.weight.grad is None
    assert emb.new.grad is not None and (emb.new.grad.abs().sum(dim=1) > 0).all()

    # Even a trainable table gets no gradient on any row from a new-token position.
    table.weight.requires_grad_(True)
    emb.new.grad = None
    out = emb(torch.tensor([[10, 11, 10]]))
    out.sum().backward()
    assert table.weight.grad is None or not table.weight.grad.any()
    assert emb.new.grad.abs().sum() > 0


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_saved_embedding_loads_in_plain_diffusers_and_reproduces_the_tuned_model(model, tokens_only):
    trainer, out = tokens_only(model, 0.1)
    record = json.loads((out / "personalization.json").read_text())
    assert record["artifact"] == {"type": "tokens", "tokens": [{"token": TOKEN, "path": EMBEDS}]}
    state = load_file(str(out / EMBEDS))
    encoders = trainer.components.text_encoders
    if model == "tiny-sdxl":
        assert set(state) == set(SDXL_KEYS)
        for key, encoder in zip(SDXL_KEYS, encoders):
            assert state[key].shape == (1, encoder.config.hidden_size)
            assert torch.equal(state[key][0], encoder.get_input_embeddings().new[0].detach())
    else:
        assert set(state) == {TOKEN}
        assert torch.equal(state[TOKEN], encoders[0].get_input_embeddings().new[0].detach())

    live = generate(trainer.components.pipeline())
    plain = generate(load_plain(load_components(f"builtin:{model}").pipeline(), out / EMBEDS))
    personalized = generate(load_personalized(out))
    np.testing.assert_array_equal(plain, live)
    np.testing.assert_array_equal(personalized, live)
    # The token learned something: before training it was exactly the word "dog".
    untrained = generate(load_components(f"builtin:{model}").pipeline(), "a photo of dog dog")
    assert np.abs(untrained - live).max() > 1e-3


@pytest.mark.parametrize("method,artifact", [({"adapter": "lora"}, "lora"),
                                             ({"adapter": "lora", "train_text_encoder": True}, "lora"),
                                             ({}, "pipeline")],
                         ids=["pivotal-lora", "pivotal-lora+te", "full-finetune"])
def test_tokens_combined_with_unet_training_reload_exactly(method, artifact, concept_dir, tmp_path):
    out = tmp_path / "out"
    trainer = run_training(token_config(concept_dir, out, method=method))
    record = json.loads((out / "personalization.json").read_text())
    assert record["artifact"]["type"] == artifact
    assert record["artifact"]["tokens"] == [{"token": TOKEN, "path": EMBEDS}] and (out / EMBEDS).is_file()
    base = load_components("builtin:tiny-sd")
    tuned = trainer.components
    base_table = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(tuned.text_encoder.get_input_embeddings().table.weight, base_table)
    unet_changed = any(not torch.equal(v, base.unet.state_dict()[k.replace("base_layer.", "")])
                       for k, v in tuned.unet.state_dict().items() if "lora_" not in k)
    assert unet_changed == (artifact == "pipeline")  # LoRA leaves the base weights alone
    if method.get("train_text_encoder"):
        lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("unet.") for k in lora)

    live = generate(tuned.pipeline())
    np.testing.assert_array_equal(generate(load_personalized(out)), live)
    if artifact == "pipeline":  # the saved pipeline holds the new row in its own table and tokenizer
        from diffusers import StableDiffusionPipeline

        saved = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
        np.testing.assert_array_equal(generate(saved), live)


def test_identifier_with_a_space_is_rejected(concept_dir, tmp_path):
    cfg = token_config(concept_dir, tmp_path / "out")
    cfg["concepts"][0]["identifier"] = "my dog"
    with pytest.raises(ConfigError, match="cannot contain spaces"):
        load_config(base=cfg)
    cfg["concepts"][0]["initializer_token"] = None  # a plain DreamBooth identifier may be several words
    del cfg["training"]["token_learning_rate"]
    assert load_config(base=cfg).concepts[0].identifier == "my dog"


def test_multi_token_initializer_is_rejected():
    components = load_components("builtin:tiny-sd")
    concept = ConceptConfig(identifier=TOKEN, initializer_token="zwx", class_noun="dog", instance_dir="unused")
    assert len(components.tokenizer("zwx", add_special_tokens=False).input_ids) == 2  # 'z', 'wx</w>'
    with pytest.raises(ConfigError, match="initializer_token 'zwx' is 2 tokens"):
        LearnedTokens([concept]).add_to(components)


def test_initializer_that_is_a_raw_vocabulary_piece_starts_from_that_row():
    """'ktn' (the official scripts' default) is two tokens as a word but one mid-word piece of the vocabulary."""
    components = load_components("builtin:tiny-sd")
    base_table = components.text_encoder.get_input_embeddings().weight.detach().clone()
    piece = components.tokenizer.convert_tokens_to_ids("ktn")
    assert piece != components.tokenizer.unk_token_id
    concept = ConceptConfig(identifier=TOKEN, initializer_token="ktn", class_noun="dog", instance_dir="unused")
    LearnedTokens([concept]).add_to(components)
    assert torch.equal(components.text_encoder.get_input_embeddings().new[0].detach(), base_table[piece])


def test_multi_token_initializer_fails_the_run_before_training(concept_dir, tmp_path):
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "train_unet": False},
                      concepts=token_concepts(concept_dir, initializer="zwx"))
    with pytest.raises(ConfigError, match="zwx"):
        run_training(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("identifier", ["sks", "<|endoftext|>"])
def test_identifier_already_in_the_vocabulary_is_rejected(identifier):
    components = load_components("builtin:tiny-sd")
    assert len(components.tokenizer(identifier, add_special_tokens=False).input_ids) == 1  # already one known token
    concept = ConceptConfig(identifier=identifier, initializer_token="dog", class_noun="dog", instance_dir="unused")
    with pytest.raises(ConfigError, match=re.escape(f"identifier {identifier!r} is already a word")):
        LearnedTokens([concept]).add_to(components)


def test_config_rejects_options_that_contradict_learned_tokens(concept_dir, tmp_path):
    cfg = token_config(concept_dir, tmp_path / "out", method={"train_unet": False})
    cfg["training"]["cache_text_embeddings"] = True
    with pytest.raises(ConfigError, match="cache_text_embeddings cannot be used with learned tokens"):
        load_config(base=cfg)
    plain = base_config(concept_dir, tmp_path / "out", training={"token_learning_rate": 0.1})
    with pytest.raises(ConfigError, match="token_learning_rate is set but no concept has an initializer_token"):
        load_config(base=plain)
    # tokens alone are something to train
    tokens_only = load_config(base=token_config(concept_dir, tmp_path / "out", method={"train_unet": False}))
    assert tokens_only.method.train_unet is False


def test_full_finetune_with_tokens_under_bf16_exports_a_float32_text_encoder(concept_dir, tmp_path):
    out = tmp_path / "out"
    run_training(token_config(concept_dir, out, method={}, mixed_precision="bf16", max_train_steps=1))
    saved = load_file(str(out / "text_encoder" / "model.safetensors"))
    base = load_components("builtin:tiny-sd").text_encoder.state_dict()
    row = load_file(str(out / EMBEDS))[TOKEN]
    assert row.dtype == torch.float32
    key = next(k for k in saved if k.endswith("token_embedding.weight"))
    assert saved.keys() == base.keys()
    dtypes = {v.dtype for v in saved.values()}
    assert dtypes == {torch.float32}, "only the token row trained: the text encoder must be exported in float32"
    assert torch.equal(saved[key][:-1], base[key]) and torch.equal(saved[key][-1], row)
    assert not [k for k in base if k != key and not torch.equal(saved[k], base[k])]


def test_stop_and_resume_gives_bitwise_identical_token_rows(concept_dir, tmp_path):
    training = {"max_train_steps": 4, "checkpointing_steps": 2, "lr_scheduler": "cosine", "lr_warmup_steps": 1,
                "adam_weight_decay": 0.1}
    method = {"train_unet": False}
    straight = run_training(token_config(concept_dir, tmp_path / "straight", method=method, **training))

    out = tmp_path / "resumed"
    run_training(token_config(concept_dir, out, method=method, stop_after_step=2, **training))
    assert not (out / "personalization.json").exists()
    stopped_at = load_file(str(out / "checkpoints" / "checkpoint-000002" / "trainable.safetensors"))
    resumed = run_training(token_config(concept_dir, out, method=method, resume="latest", **training))

    a, b = load_file(str(tmp_path / "straight" / EMBEDS)), load_file(str(out / EMBEDS))
    assert a.keys() == b.keys() == {TOKEN}
    assert torch.equal(a[TOKEN], b[TOKEN]), "the resumed token row differs from the uninterrupted run"
    rows = [t.components.text_encoder.get_input_embeddings().new.detach() for t in (straight, resumed)]
    assert torch.equal(*rows)
    # the checkpoint holds exactly the token rows, and training went on after it
    (key,) = stopped_at
    assert key.startswith("text_encoder.") and key.endswith("token_embedding.new")
    assert not torch.equal(stopped_at[key], rows[1])
