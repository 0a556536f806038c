"""Class images: generated once into a content-hashed cache, reused by later runs, or supplied by the user."""


from conftest import base_config, run_training
from t2i_personal.data.images import list_image_files
from t2i_personal.data.priors import ensure_class_images
from t2i_personal.models.loading import load_components


def test_class_image_cache_is_idempotent(concept_dir, tmp_path):
    class_dir = tmp_path / "class"
    cfg = base_config(concept_dir, tmp_path / "a", method={"name": "dreambooth", "adapter": "lora", "prior": "class_images"})
    cfg["concepts"][0].update(class_dir=str(class_dir), num_class_images=3)
    run_training(cfg)
    first = {p.name: p.stat().st_mtime_ns for p in list_image_files(class_dir)}
    assert len(first) == 3
    assert all(len(name.split("-")[1].split(".")[0]) == 16 for name in first), "content-hash names"

    cfg["training"]["output_dir"] = str(tmp_path / "b")
    run_training(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in list_image_files(class_dir)} == first, "second run generated images"


def test_interrupted_generation_resumes_with_the_same_images(tmp_path):
    components = load_components("builtin:tiny-sd")
    kwargs = dict(resolution=32, steps=2, guidance=5.0, batch_size=2, seed=0, device=components.unet.device)
    full, partial = tmp_path / "full", tmp_path / "partial"
    assert ensure_class_images(components.pipeline, full, "a photo of dog", 3, **kwargs) == 3
    assert ensure_class_images(components.pipeline, partial, "a photo of dog", 2, **kwargs) == 2
    assert ensure_class_images(components.pipeline, partial, "a photo of dog", 3, **kwargs) == 1
    assert ensure_class_images(components.pipeline, partial, "a photo of dog", 3, **kwargs) == 0
    assert [p.name for p in list_image_files(full)] == [p.name for p in list_image_files(partial)]


def test_supplied_class_images_are_used_without_generation(concept_dir, tmp_path, monkeypatch):
    from t2i_personal.data.examples import write_examples
    from t2i_personal.models.components import Components

    supplied = tmp_path / "supplied"
    write_examples(supplied, count=2, size=40)

    def no_generation(*args, **kwargs):
        raise AssertionError("must not generate when enough class images are supplied")

    monkeypatch.setattr(Components, "pipeline", no_generation)  # generation needs a pipeline: forbid it
    cfg = base_config(concept_dir, tmp_path / "out", method={"name": "dreambooth", "adapter": "lora", "prior": "class_images"})
    cfg["concepts"][0].update(class_dir=str(supplied), num_class_images=2)
    before = sorted(p.name for p in supplied.iterdir())
    trainer = run_training(cfg)
    assert sorted(p.name for p in supplied.iterdir()) == before
    assert "prior" in trainer.last_logs
