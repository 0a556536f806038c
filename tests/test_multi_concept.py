"""Several concepts in one run: ``ConceptDataset`` balances them whatever their image counts (item ``i`` belongs
to concept ``i % K``), each prior sample belongs to its instance's concept, and a short run samples every concept
and learns every concept's token."""

from collections import Counter

import pytest
import torch

from conftest import base_config, run_training
from t2i_personal.config import ConceptConfig
from t2i_personal.data.concepts import ConceptDataset, Example, StreamBatchSampler, load_instance_examples
from t2i_personal.data.examples import write_examples
from t2i_personal.data.transforms import ImageTransform
from t2i_personal.models.loading import load_components
from t2i_personal.training import loop


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-concepts")
    write_examples(root / "small", count=2, size=48)
    write_examples(root / "large", count=5, size=48)
    return root / "small", root / "large"


def two_concepts(two_folders) -> list[dict]:
    small, large = two_folders
    return [{"identifier": "<new1>", "initializer_token": "dog", "class_noun": "dog", "instance_dir": str(small)},
            {"identifier": "<new2>", "initializer_token": "cat", "class_noun": "cat", "instance_dir": str(large)}]


def make_dataset(two_folders, priors=None):
    concepts = [ConceptConfig(**c) for c in two_concepts(two_folders)]
    instances = load_instance_examples(concepts, max_pixels=10**7)
    prompts = sorted({e.prompt for e in instances} | {e.prompt for g in priors or [] for e in g})
    return ConceptDataset(instances, priors, ImageTransform(32), {p: i for i, p in enumerate(prompts)}, seed=0)


def test_items_alternate_concepts_and_balance_an_epoch(two_folders):
    dataset = make_dataset(two_folders)
    assert [sum(e.concept == c for e in dataset.instances) for c in (0, 1)] == [2, 5]
    assert len(dataset) == 2 * 5  # K x the largest concept
    concept_of = [dataset.instances[dataset[(i, 0)][0]["key"][1]].concept for i in range(len(dataset))]
    assert concept_of == [i % 2 for i in range(len(dataset))]
    used = Counter(dataset[(i, 0)][0]["key"][1] for i in range(len(dataset)))
    small = [i for i, e in enumerate(dataset.instances) if e.concept == 0]
    large = [i for i, e in enumerate(dataset.instances) if e.concept == 1]
    assert sorted(used[i] for i in small) == [2, 3], "the 2 images of the small concept fill its 5 slots"
    assert all(used[i] == 1 for i in large), "each of the 5 large-concept images once"

    # Whatever the order the sampler draws, one epoch (len(dataset) stream positions) is half each concept.
    for seed in range(3):
        sampler = StreamBatchSampler(len(dataset), batch_size=2, seed=seed)
        epoch = [item for m in range(len(dataset) // 2) for item in sampler.batch(m)]
        assert sorted(i for i, _ in epoch) == list(range(len(dataset))) and {e for _, e in epoch} == {0}
        assert Counter(i % 2 for i, _ in epoch) == {0: 5, 1: 5}


def test_prior_samples_belong_to_the_instance_concept(two_folders):
    plain = make_dataset(two_folders)
    priors = [[Example(e.image, e.path, "a photo of dog", 0, True) for e in plain.instances if e.concept == 0][:1],
              [Example(e.image, e.path, "a photo of cat", 1, True) for e in plain.instances if e.concept == 1][:3]]
    dataset = make_dataset(two_folders, priors)
    prompts = {i: p for p, i in dataset.prompt_index.items()}
    for index in range(len(dataset)):
        instance, prior = dataset[(index, 1)]
        concept = dataset.instances[instance["key"][1]].concept
        assert concept == index % 2 and prior["is_prior"]
        assert dataset.example(prior["key"]).concept == concept
        assert prompts[prior["prompt"]] == ("a photo of dog", "a photo of cat")[concept]


def test_a_short_run_samples_and_learns_both_concepts(two_folders, monkeypatch, tmp_path):
    seen = []
    original = loop.micro_step

    def recording(run, batch):
        prompts = {i: p for p, i in run.dataset.prompt_index.items()}
        seen.append([prompts[i] for i in batch["prompt"]])
        return original(run, batch)

    monkeypatch.setattr(loop, "micro_step", recording)
    # 5 steps x 2 images = exactly one epoch of the 10-item dataset
    cfg = base_config(two_folders[0], tmp_path / "out", method={"name": "dreambooth", "train_unet": False},
                      concepts=two_concepts(two_folders),
                      training={"max_train_steps": 5, "train_batch_size": 2, "token_learning_rate": 0.5})
    trainer = run_training(cfg)
    assert len(seen) == 5 and all(len(b) == 2 for b in seen)
    counts = Counter(p for b in seen for p in b)
    assert counts == {"a photo of <new1> dog": 5, "a photo of <new2> cat": 5}

    # both identifiers became tokens and both rows trained; the rest of the table is the base model's
    base = load_components("builtin:tiny-sd").text_encoder.get_input_embeddings().weight
    emb = trainer.components.text_encoder.get_input_embeddings()
    assert emb.new.shape[0] == 2 and torch.equal(emb.table.weight, base)
    tok = trainer.components.tokenizer
    for row, init in enumerate(("dog", "cat")):
        init_row = base[tok(init, add_special_tokens=False).input_ids[0]]
        assert (emb.new[row].detach() - init_row).abs().max() > 1e-2, f"token {row + 1} did not train"
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("learned_embeds-*.safetensors")) == [
        "learned_embeds-0-new1.safetensors", "learned_embeds-1-new2.safetensors"]
