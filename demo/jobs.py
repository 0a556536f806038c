"""The training queue: each job is ``train/train.py`` on a YAML in a child process, one at a time, the others
waiting in order. Cancel sends the child Ctrl-C, so it stops with a resumable checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from t2i_personal.atomic import write_text_atomic
from t2i_personal.record import RECORD_NAME
from t2i_personal.training.checkpoint import list_checkpoints
from t2i_personal.training.run_folder import progress_log_path

from . import ROOT
from .configs import config_yaml
from .errors import DemoError
from .workspace import Workspace, unique_folder


@dataclass
class TrainingJob:
    id: str
    config_path: Path
    output_dir: Path
    max_steps: int
    state: str = "queued"  # queued, running, finished, failed, cancelled
    message: str = ""
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    cancel_requested: bool = False
    extra: list[str] = field(default_factory=list)  # overrides after the YAML, e.g. training.resume=latest

    def progress(self) -> list[dict]:
        """The trainer's progress log lines (steps and validation grids) so far."""
        path = progress_log_path(self.output_dir)
        if not path.is_file():
            return []
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
        return lines

    def latest_grid(self) -> Path | None:
        grids = sorted((self.output_dir / "validation").glob("step-*.png"))
        return grids[-1] if grids else None


class TrainingQueue:
    """One training process at a time; later jobs wait in order. Each job is ``train/train.py`` on a YAML."""

    def __init__(self, workspace: Workspace, python: str = sys.executable):
        self.workspace, self.python = workspace, python
        self.jobs: dict[str, TrainingJob] = {}
        self._pending: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._worker, daemon=True, name="training-queue").start()

    def submit(self, config, extra_overrides: tuple[str, ...] = ()) -> TrainingJob:
        with self._lock:  # two jobs queued before either started must not share an output or job folder
            requested = Path(config.training.output_dir)
            out = unique_folder(requested.parent, requested.name, {j.output_dir for j in self.jobs.values()})
            config.training.output_dir = str(out)
            job_dir = unique_folder(self.workspace.root / "jobs", out.name)
            job_dir.mkdir(parents=True)
        config_path = write_text_atomic(job_dir / "config.yaml", config_yaml(config))
        job = TrainingJob(job_dir.name, config_path, out, config.training.max_train_steps,
                          log_path=job_dir / "train.log", extra=list(extra_overrides))
        self._enqueue(job)
        return job

    def _enqueue(self, job: TrainingJob) -> None:
        with self._lock:
            self.jobs[job.id] = job
            self._pending.append(job.id)
        self._wake.set()

    def position(self, job_id: str) -> int | None:
        """1 for the next job to start, None when not waiting."""
        with self._lock:
            return self._pending.index(job_id) + 1 if job_id in self._pending else None

    def current(self) -> str | None:
        """The job a freshly opened page follows: the running one, else the last one submitted (None: no jobs)."""
        with self._lock:
            running = [job.id for job in self.jobs.values() if job.state == "running"]
            return running[0] if running else next(reversed(self.jobs), None)

    def resume(self, job_id: str) -> TrainingJob:
        """Queue a cancelled job again; it continues from its last checkpoint."""
        with self._lock:
            old = self._job(job_id)
            if old.state != "cancelled" or not list_checkpoints(old.output_dir):
                raise DemoError(f"job {job_id} is {old.state} with no checkpoint to continue from; only a cancelled "
                                "job that saved a checkpoint can be resumed (train it again instead)")
            job = TrainingJob(old.id, old.config_path, old.output_dir, old.max_steps, log_path=old.log_path,
                              extra=["training.resume=latest"])
        self._enqueue(job)
        return job

    def cancel(self, job_id: str) -> TrainingJob:
        with self._lock:
            job = self._job(job_id)
            if job.state == "queued":
                self._pending.remove(job_id)
                job.state, job.message = "cancelled", "cancelled before it started"
            elif job.state == "running" and job.process is not None and not job.cancel_requested:
                job.cancel_requested = True  # one signal only: a second one would abort without a checkpoint
                job.process.send_signal(signal.SIGINT)  # the trainer finishes its step and saves a checkpoint
        return job

    def _job(self, job_id: str) -> TrainingJob:
        if job_id not in self.jobs:
            raise DemoError("no such training job (start one with Train)")
        return self.jobs[job_id]

    def stop_all(self) -> None:
        """On exit: running training is asked to stop with a checkpoint."""
        for job in list(self.jobs.values()):
            if job.state == "running" and job.process is not None and job.process.poll() is None:
                job.process.send_signal(signal.SIGINT)

    def wait(self, job_id: str, timeout: float = 3600) -> TrainingJob:
        deadline = time.monotonic() + timeout
        while self.jobs[job_id].state in ("queued", "running"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"training job {job_id} still {self.jobs[job_id].state} after {timeout} s")
            time.sleep(0.2)
        return self.jobs[job_id]

    def _worker(self):
        while True:
            self._wake.wait()
            with self._lock:
                job = self.jobs[self._pending.popleft()] if self._pending else None
                if job is None:
                    self._wake.clear()
                    continue
                job.state = "running"
            try:  # whatever happens to one job, the queue goes on
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - shown to the user, never kills the worker
                job.state, job.message = "failed", f"could not run the training: {exc}"

    def _run(self, job: TrainingJob) -> None:
        with open(job.log_path, "a") as log:
            # Same process group as the app: Ctrl-C in its terminal also stops the training, with a checkpoint.
            # (A child in its own session, start_new_session=True, stalled in its final validation here; cause unknown.)
            job.process = subprocess.Popen(
                [self.python, str(ROOT / "train" / "train.py"), "--config", str(job.config_path), *job.extra],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
            code = job.process.wait()
        errors = [line for line in job.log_path.read_text(errors="replace").splitlines() if line.startswith("error:")]
        if code == 0 and (job.output_dir / RECORD_NAME).is_file():
            job.state, job.message = "finished", f"finished: {job.output_dir}"
        elif job.cancel_requested or code == 130:  # 130: stopped by a signal after saving a checkpoint
            job.state = "cancelled"
            job.message = ("cancelled: a resumable checkpoint was kept (Resume continues from it)"
                           if list_checkpoints(job.output_dir) else "cancelled before the first step (no checkpoint)")
        else:
            job.state = "failed"
            job.message = errors[-1] if errors else f"training exited with code {code}; see {job.log_path}"
