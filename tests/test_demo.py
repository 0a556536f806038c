"""The Gradio demo's callbacks: uploads, configs, the training queue (train, cancel, resume), generation with
FreeCure and evaluation, on the toy world. The browser test is in test_demo_browser.py."""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT))  # demo/ is not installed: demo/app.py puts the checkout on the path the same way
from demo.app import build_app  # noqa: E402
from demo.configs import TOY, build_config, config_yaml  # noqa: E402
from demo.errors import DemoError  # noqa: E402
from demo.evaluation import publish_report, report_link, run_evaluation, summary_table  # noqa: E402
from demo.generator import Generator  # noqa: E402
from demo.jobs import TrainingQueue  # noqa: E402
from demo.tabs.train import caption_rows  # noqa: E402
from demo.workspace import Workspace  # noqa: E402

DOG = sorted((ROOT / "t2i_personal" / "toyworld" / "assets" / "subjects" / "dog").glob("*.png"))
FAST = {"method.prior": "none", "training.max_train_steps": 2}


def quick_config(workspace, folder, name: str, steps: int = 2):
    """The toy subject preset as the Train tab builds it (no prior, ``steps`` steps), with cuts the tab does not offer
    so that a run costs little more than its process start: one image a step, a validation grid of one image sampled
    in two steps, no tensorboard (progress.jsonl is kept)."""
    config = build_config(workspace, "subject", "sks", "dog", "builtin:toy", folder, name,
                          {**FAST, "training.max_train_steps": steps})
    config.training.train_batch_size = 1
    config.training.report_to = "none"
    config.validation.prompts = config.validation.prompts[:1]
    config.validation.num_images_per_prompt = 1
    config.validation.num_inference_steps = 2
    return config


@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path / "work", max_uploads=5, max_upload_mb=1)


def test_uploads_are_checked_and_stored_under_fixed_names(workspace, tmp_path):
    odd = tmp_path / "..%2F..%2Fescape me.png"  # the uploaded name is never used as a path
    Image.open(DOG[0]).convert("RGBA").save(odd)
    folder = workspace.save_uploads([odd, *DOG[1:3]], ["a photo of {V} {C} asleep", "", "  "], name="../../My Dog!")
    assert folder.parent == workspace.root / "uploads" and folder.name == "my-dog"
    assert sorted(p.name for p in folder.iterdir()) == ["image-00.png", "image-00.txt", "image-01.png", "image-02.png"]
    assert Image.open(folder / "image-00.png").mode == "RGB"  # RGBA flattened on white like the trainer does
    assert (folder / "image-00.txt").read_text() == "a photo of {V} {C} asleep\n"
    assert workspace.save_uploads(DOG[:3], name="my dog").name == "my-dog-2"  # never overwrites


@pytest.mark.parametrize("case, message", [
    ("none", r"0 image\(s\) uploaded: upload 3-5"), ("one", r"1 image\(s\)"), ("too_many", "at most 5"),
    ("text", "notes.txt: not an image file"), ("corrupt", "broken.png"), ("too_big", "huge.png: .* over the 1 MB limit")])
def test_bad_uploads_get_a_clear_message_and_write_nothing(workspace, tmp_path, case, message):
    files = {"none": [], "one": DOG[:1], "too_many": DOG * 2, "text": [*DOG[:2], tmp_path / "notes.txt"],
             "corrupt": [*DOG[:2], tmp_path / "broken.png"], "too_big": [*DOG[:2], tmp_path / "huge.png"]}[case]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(tmp_path / "huge.png")
    with pytest.raises(DemoError, match=message):
        workspace.save_uploads(files)
    assert list((workspace.root / "uploads").iterdir()) == []


def test_captions_typed_for_a_file_stay_when_files_are_added_or_removed():
    first = caption_rows(["/tmp/a/dog-0.png", "/tmp/a/dog-1.png"], None)
    assert first == [["dog-0.png", ""], ["dog-1.png", ""]]
    typed = [["dog-0.png", "a {V} {C} asleep"], ["dog-1.png", float("nan")]]  # an empty cell can arrive as NaN
    assert caption_rows(["/tmp/b/dog-2.png", "/tmp/a/dog-0.png"], typed) == [["dog-2.png", ""],
                                                                           ["dog-0.png", "a {V} {C} asleep"]]
    assert caption_rows(None, typed) == []


def test_paths_outside_the_work_folder_are_refused(workspace):
    assert workspace.inside(workspace.root / "runs" / "x") == workspace.root / "runs" / "x"
    with pytest.raises(DemoError, match="outside the work folder"):
        workspace.inside(workspace.root / ".." / "elsewhere")


@pytest.mark.parametrize("kind, method, prior", [("subject", "dreambooth", "class_images"),
                                                 ("face", "dreambooth", "none"), ("style", "styleforge", "auxiliary")])
def test_each_kind_picks_its_preset(workspace, kind, method, prior):
    config = build_config(workspace, kind, "zwx", "thing", "builtin:toy", "/data/imgs", "",
                          {"training.max_train_steps": 7, "method.lora.rank": 4, "method.adapter": ""})
    assert (config.method.name, config.method.prior) == (method, prior)
    assert config.training.max_train_steps == 7 and config.method.lora.rank == 4
    assert config.concepts[0].identifier == "zwx" and config.concepts[0].instance_dir == "/data/imgs"
    assert Path(config.training.output_dir).parent == workspace.root / "runs"
    for concept in config.concepts:  # generated class images stay in the work folder, auxiliary ones are read only
        if prior == "class_images":
            assert workspace.root in Path(concept.class_dir).parents
        elif prior == "auxiliary":
            assert Path(concept.class_dir).is_dir() and ROOT in Path(concept.class_dir).parents
    text = config_yaml(config)
    assert "identifier: zwx" in text and "max_train_steps: 7" in text


def test_real_base_models_get_the_real_presets(workspace, tmp_path):
    config = build_config(workspace, "subject", "<sks>", "dog", "runwayml/stable-diffusion-v1-5", "/d")
    assert config.model.pretrained == "runwayml/stable-diffusion-v1-5" and config.method.spl.weight > 0
    assert config.concepts[0].identifier == "<sks>" and config.concepts[0].initializer_token  # learned as a new token
    assert workspace.root in Path(config.concepts[0].class_dir).parents  # not the preset's relative folder
    with pytest.raises(DemoError, match="needs auxiliary images"):
        build_config(workspace, "style", "zwx", "style", "runwayml/stable-diffusion-v1-5", "/d")
    aux = workspace.save_uploads(DOG[:3], name="aux")
    config = build_config(workspace, "style", "zwx", "style", "runwayml/stable-diffusion-v1-5", "/d", auxiliary_dir=aux)
    assert config.concepts[0].class_dir == str(aux)
    assert build_config(workspace, "style", "zwx", "style", "runwayml/stable-diffusion-v1-5", "/d",
                        advanced={"method.prior": "none"}).method.prior == "none"


@pytest.mark.parametrize("base", ["builtin:tiny-flux", "builtin:tiny-sd3"])
def test_flow_matching_base_models_get_their_family_preset(workspace, base):
    """A FLUX / SD3 base gets its family's preset (the SD presets' DDPM options would be refused there)."""
    config = build_config(workspace, "subject", "sks", "dog", base, "/d")
    assert config.model.pretrained == base and config.training.snr_gamma is None
    assert config.training.cache_text_embeddings and config.method.adapter == "lora"


def test_a_word_of_the_vocabulary_is_refused_before_it_is_queued_where_the_identifier_is_learned(workspace):
    # The subject preset on a real base learns the identifier as a new token, and training would fail on 'sks' (a
    # word of CLIP's vocabulary) after minutes of class-image generation; the message names the fixes.
    real = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    for word in ("sks", "SKS", "dog"):
        with pytest.raises(DemoError, match=rf"{word!r} is already a word .* such as '<{word}>'.* kind 'face'"):
            build_config(workspace, "subject", word, "dog", real, "/d")
    assert build_config(workspace, "subject", "<sks>", "dog", real, "/d").concepts[0].identifier == "<sks>"
    assert build_config(workspace, "subject", "zwx", "dog", real, "/d").concepts[0].identifier == "zwx"  # 2 tokens
    # where the identifier is not learned as a token, a rare word is what DreamBooth wants
    for kind, base in (("face", real), ("style", real), ("subject", TOY)):
        advanced = {"method.prior": "none"} if kind == "style" else None
        config = build_config(workspace, kind, "sks", "dog", base, "/d", advanced=advanced)
        assert config.concepts[0].identifier == "sks" and not config.concepts[0].initializer_token


def test_config_errors_are_shown_as_the_cli_words_them(workspace):
    with pytest.raises(DemoError, match="identifier"):
        build_config(workspace, "subject", " ", "dog", "builtin:toy", "/d")
    with pytest.raises(DemoError, match="learning_rate"):
        build_config(workspace, "subject", "sks", "dog", "builtin:toy", "/d", advanced={"training.learning_rate": "fast"})
    with pytest.raises(DemoError, match="unknown kind"):
        build_config(workspace, "landscape", "sks", "dog", "builtin:toy", "/d")


def test_free_text_stays_the_words_typed(workspace):
    config = build_config(workspace, "subject", "sks #1", "true", "builtin:toy", "/d")
    assert (config.concepts[0].identifier, config.concepts[0].class_noun) == ("sks #1", "true")


def test_only_finished_results_are_loaded(workspace):
    for bad in ("", None, "/etc", str(workspace.root / "runs" / "nothing")):
        with pytest.raises(DemoError):
            workspace.check_result(bad)


def test_a_job_that_cannot_start_fails_and_the_queue_goes_on(workspace):
    queue = TrainingQueue(workspace, python=str(workspace.root / "no-such-python"))
    config = build_config(workspace, "subject", "sks", "dog", "builtin:toy", "/d", "x", FAST)
    assert queue.current() is None
    job = queue.wait(queue.submit(config).id, 60)
    assert job.state == "failed" and "could not run the training" in job.message
    later = queue.wait(queue.submit(config).id, 60)
    assert later.state == "failed"  # the worker is still alive
    assert queue.current() == later.id  # with none running, a reloaded page follows the last job submitted
    with pytest.raises(DemoError, match="no checkpoint"):
        queue.resume(job.id)
    with pytest.raises(DemoError, match="no such training job"):
        queue.cancel("nope")


def test_the_app_builds(workspace):
    import gradio as gr

    queue = TrainingQueue(workspace)
    assert isinstance(build_app(workspace, queue), gr.Blocks)


def test_the_freecure_omega_typed_reaches_freecure(monkeypatch):
    # Stand-ins for a loaded result and FreeCure: what is checked is the value passed on, and that a new value
    # builds a new FreeCure while the same one reuses it (it may hold a foundation model).
    import t2i_personal.freecure as freecure_module
    from t2i_personal.models.tokenizer import build_clip_tokenizer

    built = []

    class FakeCure:
        def __init__(self, pipe, options):
            built.append(options)

        def __call__(self, prompt, **kwargs):
            image = Image.new("RGB", (8, 8))
            return SimpleNamespace(personalized_images=[image], foundation_images=[image], mask=[image],
                                   images=[image], mask_sources={"hat": "cross_attention"})

    pipe = SimpleNamespace(tokenizer=build_clip_tokenizer(), set_progress_bar_config=lambda **_: None,
                           _t2i_personal_record={"config": {"data": {"resolution": 8}}})
    monkeypatch.setattr(freecure_module, "FreeCure", FakeCure)
    generate = Generator()
    monkeypatch.setattr(generate, "pipeline", lambda result: pipe)
    for omega in (0.7, 0.7, None, ""):  # a blank number field arrives as None
        out = generate("result", "a photo of sks dog wearing a red hat", freecure=True, omega=omega)
        assert out["attributes"] == "hat (cross_attention)"
    assert [options.omega for options in built] == [0.7, None]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 2-step toy result through the queue (the path the Train button takes)."""
    workspace = Workspace(tmp_path_factory.mktemp("demo") / "work")
    queue = TrainingQueue(workspace)
    folder = workspace.save_uploads(DOG[:3], name="dog")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # for the training children: see one_torch_thread in conftest
        first = queue.submit(quick_config(workspace, folder, "dog"))
        second = queue.submit(quick_config(workspace, folder, "dog"))
        assert second.state == "queued"  # one training at a time
        while first.state == "queued":
            time.sleep(0.05)
        assert queue.current() == first.id  # a reloaded page follows the running job, not the newest
        assert queue.wait(first.id, 600).state == "finished", first.log_path.read_text()[-3000:]
        assert queue.wait(second.id, 600).state == "finished", second.log_path.read_text()[-3000:]
    return workspace, queue, first


@pytest.mark.slow
def test_training_through_the_queue_writes_a_result_with_progress(trained):
    workspace, _, job = trained
    assert str(job.output_dir) in [str(p) for p in workspace.results()]
    lines = job.progress()
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert job.latest_grid() is not None and job.latest_grid().is_file()


@pytest.mark.slow
def test_cancel_keeps_a_resumable_checkpoint_and_resume_finishes(trained, monkeypatch):
    workspace, queue, _ = trained
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the training children: see one_torch_thread in conftest
    folder = workspace.save_uploads(DOG[:3], name="dog")
    job = queue.submit(quick_config(workspace, folder, "long", steps=40))
    deadline = time.monotonic() + 300
    while not job.progress():
        assert job.state in ("queued", "running") and time.monotonic() < deadline, job.log_path.read_text()[-3000:]
        time.sleep(0.1)
    queue.cancel(job.id)
    queue.cancel(job.id)  # a second click must not abort the checkpoint being written
    assert queue.wait(job.id, 300).state == "cancelled", job.log_path.read_text()[-3000:]
    assert "resumable checkpoint" in job.message
    assert list((job.output_dir / "checkpoints").glob("checkpoint-*"))
    assert job.output_dir not in workspace.results()
    resumed = queue.resume(job.id)
    assert queue.wait(resumed.id, 600).state == "finished", resumed.log_path.read_text()[-3000:]
    assert [line["step"] for line in resumed.progress() if "loss" in line] == list(range(1, 41))


@pytest.mark.slow
def test_generate_with_and_without_freecure(trained, one_torch_thread):
    _, _, job = trained
    generate = Generator()
    plain = generate(str(job.output_dir), "a photo of sks dog on the beach", seed=3, steps=4)
    assert set(plain) == {"personalized"} and plain["personalized"].size == (64, 64)
    again = generate(str(job.output_dir), "a photo of sks dog on the beach", seed=3, steps=4)
    assert np.array_equal(np.asarray(plain["personalized"]), np.asarray(again["personalized"]))  # seeded
    cured = generate(str(job.output_dir), "a photo of sks dog wearing a red hat", seed=3, steps=4, freecure=True,
                     attributes="hat", mask_source="cross_attention")
    assert cured["foundation"].size == cured["repaired"].size == (64, 64)
    assert "hat (cross_attention)" in cured["attributes"]
    with pytest.raises(DemoError, match="tokens long"):
        generate(str(job.output_dir), "a photo of sks dog " + "very " * 80)
    with pytest.raises(DemoError, match="write a prompt"):
        generate(str(job.output_dir), "  ")


@pytest.mark.slow
def test_evaluate_a_pasted_prompt_list(trained, one_torch_thread):
    workspace, _, job = trained
    summary, out = run_evaluation(workspace, [str(job.output_dir)], "pasted list",
                                  "a photo of {V} {C}\na photo of {V} {C} in the snow", images_per_prompt=1,
                                  steps=3, progress=False)
    rows = summary_table(summary)
    assert {r[1] for r in rows} == {"clip_t", "clip_i", "ti_clip"} and all(r[2] is not None for r in rows)
    assert (out / "report.html").is_file() and workspace.root in out.parents
    served, archive = publish_report(workspace, out)
    assert served.parent.parent == workspace.root / "downloads" and served.read_bytes() == (out / "report.html").read_bytes()
    assert {p.relative_to(served.parent) for p in served.parent.rglob("*")} == {p.relative_to(out) for p in out.rglob("*")}
    import zipfile

    assert "report.html" in zipfile.ZipFile(archive).namelist()
    assert publish_report(workspace, out)[0] != served  # a second publication does not overwrite the first
    assert 'href="gradio_api/file=' in report_link(served)
    with pytest.raises(DemoError, match="not a finished result"):
        run_evaluation(workspace, ["/etc"], "dreambench")
    with pytest.raises(DemoError, match="paste one prompt"):
        run_evaluation(workspace, [str(job.output_dir)], "pasted list", "  \n")
