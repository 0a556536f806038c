"""The trainer: set up a run (``setup.py``), resume it, run the step loop (``loop.py``), validate and export
(``outputs.py``). It knows losses only through ``Method.loss_terms``, parameters only through
``Method.trainable_parameters`` and the model only through its family; everything specific to a paper lives in
``t2i_personal/methods``, everything specific to a model generation in ``t2i_personal/families``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file

from ..config import TrainConfig
from . import checkpoint as ckpt
from . import run_folder
from .loop import train_steps
from .outputs import EMA_FILE, export_final, validate
from .setup import Run, prepare_run

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.training.output_dir)
        # Set from another thread or a signal handler (Ctrl-C, the demo's Cancel): the loop finishes its step,
        # saves a resumable checkpoint and returns.
        self.stop_requested = threading.Event()
        self.step_seconds: list[float] = []  # per optimizer step (loss.item() synchronises), for benchmarks
        self.last_logs: dict = {}
        self.run: Run | None = None
        launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if "mixed_precision" not in config.training.model_fields_set and launcher_precision:
            # `accelerate config` / `accelerate launch --mixed_precision` decide unless the YAML says otherwise
            config.training.mixed_precision = launcher_precision

    # kept for callers (tests, the demo, benchmarks) after train()
    @property
    def components(self):
        return self.run.components

    @property
    def method(self):
        return self.run.method

    @property
    def optimizer(self):
        return self.run.optimizer

    def request_stop(self) -> None:
        """Stop after the current step with a resumable checkpoint (``training.resume=latest`` continues)."""
        self.stop_requested.set()

    def train(self) -> Path:
        """Run (or resume) training; return the output folder."""
        try:
            self.run = run = prepare_run(self.config)
            global_step = resume(run)
            t, accelerator = self.config.training, run.accelerator
            if accelerator.is_main_process and t.report_to != "none":
                flat = {k: str(v) if isinstance(v, list) else v
                        for k, v in ckpt.flatten(self.config.model_dump(mode="json")).items() if v is not None}
                accelerator.init_trackers("t2i-personal", config=flat)
            self.step_seconds.clear()
            global_step = train_steps(run, self, global_step)
            if global_step < t.max_train_steps:
                logger.info("stopped after step %d; resume with training.resume=latest", global_step)
            else:
                if run.validation_prompts:
                    with run.averaged():
                        validate(self.config, run.components, run.validation_prompts, accelerator, run.weight_dtype,
                                 global_step)
                if accelerator.is_main_process:
                    export_final(run, global_step)
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return self.output_dir
        finally:
            run_folder.release(self.run.lock if self.run is not None else None)


def resume(run: Run) -> int:
    """Load the checkpoint to resume from (optimizer, schedule, trainable tensors); the step it ended at."""
    if run.resume_from is None:
        return 0
    try:
        run.accelerator.load_state(str(run.resume_from))
        run.method.load_trainable_state_dict(run.components, load_file(str(run.resume_from / "trainable.safetensors")))
        if run.ema is not None:
            run.ema.load_state_dict(load_file(str(run.resume_from / EMA_FILE)))
    except Exception as exc:  # noqa: BLE001 -- a truncated optimizer state, a mismatched tensor, ...
        raise ckpt.damaged_checkpoint(run.resume_from, exc) from exc
    state = ckpt.read_checkpoint_state(run.resume_from)
    step, run.nonfinite_steps = state["global_step"], state.get("nonfinite_steps", 0)
    logger.info("resumed from %s at step %d", run.resume_from, step)
    return step


def train(config: TrainConfig) -> Path:
    return Trainer(config).train()


@contextmanager
def stop_on_signals(trainer: Trainer, signals=(signal.SIGINT, signal.SIGTERM)):
    """The first Ctrl-C / SIGTERM asks ``trainer`` to stop after its current step with a resumable checkpoint; a
    second one aborts at once (the default behaviour)."""
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handle(signum, frame):
        if trainer.stop_requested.is_set():
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        logger.warning("stopping after this step with a checkpoint (send the signal again to abort at once)")
        trainer.request_stop()

    for sig in signals:
        signal.signal(sig, handle)
    try:
        yield trainer
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
