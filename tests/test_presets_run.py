"""Every method preset trains end to end on a built-in model, with only what a CPU needs changed: the base model,
the size, the step count and the data folders (everything else, method settings included, is the preset's)."""

import pytest

from conftest import ROOT
from t2i_personal.config import load_config
from t2i_personal.inference.pipeline import load_personalized
from t2i_personal.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GPU_PRESETS = ["textual_inversion", "custom_diffusion", "classdiffusion", "dreambooth_lora_spl", "styleforge_single",
               "styleforge_multi"]
TOY_PRESETS = ["quickstart_classdiffusion", "quickstart_styleforge", "quickstart_face", "quickstart_flux",
               "quickstart_face_flux", "quickstart_styleforge_flux"]
FLUX_VARIANTS = {"quickstart_flux": "quickstart", "quickstart_face_flux": "quickstart_face",
                 "quickstart_styleforge_flux": "quickstart_styleforge"}
CPU = ["training.max_train_steps=2", "training.mixed_precision=no", "training.report_to=none",
       "training.progress_bar=false", "validation.prompts=[]", "training.checkpointing_steps=1000",
       "data.class_generation_steps=2", "data.class_generation_batch_size=2"]


def _train(preset: str, overrides: list[str]):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", overrides)
    trainer = Trainer(cfg)
    out = trainer.train()
    return cfg, trainer, out


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_method_preset_trains_on_the_tiny_model(preset, concept_dir, tmp_path):
    from t2i_personal.data.examples import write_examples

    aux = tmp_path / "aux"
    write_examples(aux, count=2, size=48)
    raw = load_config(ROOT / "configs" / f"{preset}.yaml")
    data = []
    for i, concept in enumerate(raw.concepts):
        data += [f"concepts.{i}.instance_dir={concept_dir}", f"concepts.{i}.num_class_images=2"]
        if concept.class_dir:
            data.append(f"concepts.{i}.class_dir={aux}")
    cfg, trainer, out = _train(preset, CPU + data + [
        "model.pretrained=builtin:tiny-sd", "data.resolution=32", f"training.output_dir={tmp_path / 'out'}"])
    assert cfg.method == raw.method  # the method settings under test are the preset's own
    assert trainer.last_logs["loss"] > 0
    if raw.method.spl is not None:
        assert trainer.last_logs["spl"] > 0
    if raw.method.prior != "none":
        assert trainer.last_logs["prior"] > 0
    pipe = load_personalized(out)
    identifier = raw.concepts[0].identifier
    image = pipe(f"a photo of {identifier} {raw.concepts[0].class_noun}", num_inference_steps=2, height=32, width=32,
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    if raw.method.prior == "auxiliary":
        assert len(list(aux.iterdir())) == 2  # auxiliary images are used as given, never generated


@pytest.mark.parametrize("preset", TOY_PRESETS)
def test_toy_world_preset_trains_on_its_shipped_data(preset, tmp_path):
    cfg, trainer, out = _train(preset, CPU + [f"training.output_dir={tmp_path / 'out'}"])
    assert cfg.model.pretrained.startswith("builtin:toy") and cfg.data.resolution == 64
    assert (out / "personalization.json").is_file() and trainer.last_logs["loss"] > 0
    if preset == "quickstart_face":  # FreeCure's README example: the toy face parser is chosen for a toy result
        from t2i_personal.freecure import FreeCure

        pipe = load_personalized(out)
        pipe.set_progress_bar_config(disable=True)
        result = FreeCure(pipe)("a photo of sks person with short blonde hair", seed=0, num_inference_steps=2)
        assert result.mask_sources == {"hair": "face_parsing"}
        assert result.foundation_prompts == ["a photo of person with short blonde hair"]
    if preset == "quickstart_flux":  # the FLUX toy model, with its trained T5 window and embedded guidance
        record = load_personalized(out)._t2i_personal_record
        assert record["family"] == "flux" and record["resolved"]["max_sequence_length"] == 32
        assert record["resolved"]["guidance_scale"] == 3.5
    if preset == "quickstart_face_flux":
        from t2i_personal.freecure import FreeCure
        from t2i_personal.freecure.masks import TOY_FACE_PARSER

        assert FreeCure(load_personalized(out))._face_parser == TOY_FACE_PARSER  # any toy-world result: toy parser


@pytest.mark.parametrize("flux_preset", FLUX_VARIANTS)
def test_flux_presets_are_their_sd_preset_on_the_flux_base(flux_preset):
    """The FLUX presets a user runs are exactly what the toy-world benchmarks measure on ``--base builtin:toy-flux``
    (the SD preset plus ``BASES``): the two cannot drift apart."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from toyworld_methods import BASES

    flux = load_config(ROOT / "configs" / f"{flux_preset}.yaml")
    as_benchmarked = load_config(ROOT / "configs" / f"{FLUX_VARIANTS[flux_preset]}.yaml",
                                 BASES["builtin:toy-flux"] + [f"training.output_dir={flux.training.output_dir}"])
    assert flux == as_benchmarked
