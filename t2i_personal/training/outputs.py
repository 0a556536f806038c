"""What a run leaves behind: validation grids, resumable checkpoints, the final export and its record, and the
live progress log (``logs/progress.jsonl``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import move_contents, publish_dir, write_json_atomic, write_text_atomic
from ..config import TrainConfig
from ..data.images import make_image_grid, save_image_atomic
from ..inference.sampling import generate
from ..models.components import Components
from ..models.loading import load_components
from ..record import CHECKPOINT_RESULT, RECORD_NAME, make_record
from . import checkpoint as ckpt
from . import run_folder

EMA_FILE = "ema.safetensors"


def open_progress_log(output_dir: Path, global_step: int):
    """``logs/progress.jsonl``, opened for appending: one JSON line per step (loss terms, lr, seconds) and per
    validation grid, for live views (the demo's loss plot). On resume, lines after the resumed step are dropped."""
    path = run_folder.progress_log_path(output_dir)
    kept = []
    if global_step and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= global_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return path.open("a", buffering=1)


@torch.no_grad()
def validate(config: TrainConfig, components: Components, prompts: list[str], accelerator, weight_dtype,
             step: int) -> Path | None:
    """A grid of ``validation.num_images_per_prompt`` images per prompt, saved as ``validation/step-NNNNNN.png``
    and sent to the trackers; the models sample without dropout and get their training mode back after."""
    if not accelerator.is_main_process:
        return None
    v, res, family = config.validation, config.data.resolution, components.family
    # a guidance-distilled model is shown at the guidance it trains with, unless the user asks otherwise
    guidance = v.guidance_scale or family.training_guidance(components.denoiser, config.training) or \
        family.default_guidance_scale
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    modes = {m: m.training for m in (components.denoiser, *components.text_encoders)}
    for m in modes:
        m.eval()  # no (LoRA) dropout while sampling
    offloaded = config.training.offload_text_encoders
    for encoder in components.text_encoders if offloaded else ():
        encoder.to(accelerator.device)
    images = []
    try:
        for i, prompt in enumerate(prompts):
            generators = [torch.Generator().manual_seed(v.seed + i * 1000 + j) for j in range(v.num_images_per_prompt)]
            images += generate(pipe, [prompt] * v.num_images_per_prompt, generators=generators,
                               autocast_dtype=None if weight_dtype == torch.float32 else weight_dtype,
                               negative_prompt=None if v.negative_prompt is None else [v.negative_prompt] * len(generators),
                               num_inference_steps=v.num_inference_steps, guidance_scale=guidance,
                               height=res, width=res, **family.pipeline_call_kwargs(components))
    finally:
        for m, was_training in modes.items():
            m.train(was_training)
        for encoder in components.text_encoders if offloaded else ():
            encoder.to("cpu")
    path = save_image_atomic(make_image_grid(images, rows=len(prompts)),
                             Path(config.training.output_dir) / "validation" / f"step-{step:06d}.png")
    _send_to_trackers(accelerator, images, [p for p in prompts for _ in range(v.num_images_per_prompt)], step)
    return path


def save_mask_sheet(config: TrainConfig, instances, accelerator) -> Path | None:
    """``validation/masks.png``: each masked instance image beside its subject mask laid over it (shown once, at
    the start of a run with ``data.masks``, so a wrong mask is seen before hours of training)."""
    import numpy as np
    from PIL import Image

    masked = [e for e in instances if e.subject_mask is not None]
    if not masked or not accelerator.is_main_process:
        return None
    side = config.data.resolution
    tiles = []
    for example in masked:
        image = example.image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
        mask = np.asarray(example.subject_mask.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)[..., None]
        tinted = np.asarray(image, dtype=np.float32) * (0.35 + 0.65 * mask / 255.0)  # background darkened
        tiles += [image, Image.fromarray(tinted.astype(np.uint8))]
    return save_image_atomic(make_image_grid(tiles, columns=2), Path(config.training.output_dir) / "validation" / "masks.png")


def _send_to_trackers(accelerator, images, captions, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, captions)]})


class Float32Base:
    """Float32 copies of base modules for exports, loaded once (on the CPU) when an export first needs them."""

    def __init__(self, config: TrainConfig):
        self.config, self.modules = config, None

    def __call__(self, names: list[str]) -> dict:
        if self.modules is None:
            self.modules = load_components(self.config.model, dtype=torch.float32).modules
        return {n: self.modules[n] for n in names}


def write_artifact(run, folder: Path, step: int) -> dict:
    """The inference artifact of the current weights into ``folder``; its description for the record. Weights that
    are not finite are never exported."""
    from ..errors import TrainingDiverged

    broken = [k for k, v in run.method.trainable_state_dict(run.components).items() if not bool(torch.isfinite(v).all())]
    if broken:
        raise TrainingDiverged(f"step {step}: {len(broken)} trained tensors hold NaN/inf (e.g. {broken[0]}); nothing was "
                               "exported. Try mixed_precision: bf16 instead of fp16 or a lower learning rate, and resume "
                               "from an earlier checkpoint.")
    with run.averaged():
        return run.method.save(run.method.export_components(run.components, run.float32_base), folder, run.config.export)


def save_checkpoint(run, step: int, with_artifact: bool = True) -> None:
    """``checkpoints/checkpoint-NNNNNN/``: accelerate's state, the trainable tensors, ``trainer_state.json`` and
    (optionally) an inference artifact, written under a temp name and renamed when complete."""
    accelerator, output_dir = run.accelerator, run.output_dir
    final = ckpt.checkpoint_dir(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-")) if accelerator.is_main_process else None
    tmp = Path(accelerator.gather_for_metrics([str(tmp)])[0]) if accelerator.num_processes > 1 else tmp
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank has written its part before the folder is published
    if accelerator.is_main_process:
        state = {k: v.detach().to("cpu").contiguous() for k, v in run.method.trainable_state_dict(run.components).items()}
        save_file(state, str(tmp / "trainable.safetensors"))
        if run.ema is not None:
            save_file(run.ema.state_dict(), str(tmp / EMA_FILE))
        if with_artifact and run.config.export.inference_artifact_in_checkpoints:
            artifact = write_artifact(run, tmp / CHECKPOINT_RESULT, step)
            write_json_atomic(tmp / CHECKPOINT_RESULT / RECORD_NAME,
                              make_record(run.config, artifact, run.components.family.name, step,
                                          run.resolved_settings))
        write_json_atomic(tmp / "trainer_state.json", {"global_step": step, "num_processes": accelerator.num_processes,
                                                       "nonfinite_steps": run.nonfinite_steps,
                                                       "config": run.config.model_dump(mode="json")})
        publish_dir(tmp, final)
        ckpt.prune_checkpoints(output_dir, run.config.training.checkpoints_total_limit)
        run_folder.remove_leftovers(output_dir)
    accelerator.wait_for_everyone()


def export_final(run, step: int) -> None:
    """The inference artifact into the output folder; ``personalization.json``, written last, marks it finished."""
    tmp = Path(tempfile.mkdtemp(dir=run.output_dir, prefix=".final-"))
    try:
        artifact = write_artifact(run, tmp, step)
        move_contents(tmp, run.output_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(run.output_dir / RECORD_NAME, make_record(run.config, artifact, run.components.family.name, step,
                                          run.resolved_settings))
