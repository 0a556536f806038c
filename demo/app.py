"""t2i-personal in the browser: train, generate (with FreeCure) and evaluate, through the same code as the CLI.

    python demo/app.py                                  # http://127.0.0.1:7860, work folder outputs/demo
    python demo/app.py --port 8080 --workdir /data/demo --host 0.0.0.0   # reachable from the network: trusted only

Everything the app writes (uploads, configs, trained results, evaluations) goes under ``--workdir``; uploaded
file names are never used as paths. Training runs ``train/train.py`` in a child process, one job at a time
(others wait in a queue); Cancel sends it Ctrl-C, so it stops with a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from t2i_personal.config import config_to_dict, load_config  # noqa: E402
from t2i_personal.data.images import ImageLoadError, load_image_rgb, save_image_atomic  # noqa: E402
from t2i_personal.errors import ConfigError, ModelLoadError  # noqa: E402
from t2i_personal.evaluation.engine import slugify  # noqa: E402
from t2i_personal.record import RECORD_NAME  # noqa: E402
from t2i_personal.training.checkpoint import list_checkpoints  # noqa: E402

TOY = "builtin:toy"
# What is being trained -> (preset on the toy world, preset on a real base model). The presets carry the
# method, rank, steps and SPL choice the README recommends for each case.
KINDS = {
    "subject": ("configs/quickstart.yaml", "configs/dreambooth_lora_spl.yaml"),
    "face": ("configs/quickstart_face.yaml", "configs/dreambooth_lora.yaml"),
    "style": ("configs/quickstart_styleforge.yaml", "configs/styleforge_single.yaml"),
}
EXAMPLE_IMAGES = ROOT / "t2i_personal" / "toyworld" / "assets" / "subjects" / "dog"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PROMPT_SETS = ("dreambench", "dreambench-live", "dreambench-objects", "pasted list")
ADVANCED = ("method.name", "method.adapter", "training.max_train_steps", "training.learning_rate", "method.prior",
            "method.spl.weight", "method.lora.rank")


class DemoError(ValueError):
    """A message for the person at the browser (shown as an error toast)."""


def slug(text: str, fallback: str = "run") -> str:
    return slugify(text, limit=40, fallback=fallback)


def _upload_path(file) -> Path:
    """Gradio hands uploads over as paths (or, in old versions, temp-file objects whose ``.name`` is the path)."""
    return Path(file) if isinstance(file, (str, Path)) else Path(file.name)


def caption_rows(files, captions) -> list[list[str]]:
    """The caption table for the uploaded files, in upload order; a caption already typed for a file name is kept
    when files are added or removed."""
    typed = {row[0]: row[1] for row in _rows(captions) if len(row) > 1 and isinstance(row[1], str) and row[1].strip()}
    names = [_upload_path(f).name for f in (files or [])]
    return [[name, typed.get(name, "")] for name in names]


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from t2i_personal.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def is_vocabulary_word(identifier: str) -> bool:
    """Whether ``identifier`` is one token of the CLIP vocabulary, which every Stable Diffusion text encoder shares
    (and the toy world too): such a word cannot be learned as a new token."""
    return len(_clip_tokenizer()(identifier, add_special_tokens=False).input_ids) == 1


def unique_folder(parent: Path, name: str, taken=()) -> Path:
    """``parent/name``, or ``name-2``, ``name-3``, ... when that exists or is in ``taken``."""
    folder, n = parent / name, 1
    while folder.exists() or folder in taken:
        n += 1
        folder = parent / f"{name}-{n}"
    return folder


# ----------------------------------------------------------------------------------------------------- workspace


@dataclass
class Workspace:
    """The app's folder and its limits: ``uploads/``, ``runs/`` (trained results), ``evals/``, ``jobs/`` (configs
    and logs), ``class-images/`` (prior samples, reused by later runs of the same class and base model)."""

    root: Path
    max_uploads: int = 20
    max_upload_mb: float = 20.0
    min_uploads: int = 3

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        for sub in ("uploads", "runs", "evals", "jobs", "class-images"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def inside(self, path: Path) -> Path:
        """``path`` resolved, refused unless it lies in the work folder."""
        resolved = Path(path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise DemoError(f"{path} is outside the work folder {self.root}")
        return resolved

    def save_uploads(self, files: list, captions: list[str] | None = None, name: str = "images") -> Path:
        """Check the uploaded images (count, size, type, readability) and store them, as PNGs named
        ``image-NN.png``, in a new folder under ``uploads/``; a non-empty caption goes next to its image."""
        paths = [_upload_path(f) for f in (files or [])]
        if len(paths) < self.min_uploads:
            raise DemoError(f"{len(paths)} image(s) uploaded: upload {self.min_uploads}-{self.max_uploads} images of the "
                            "subject or style")
        if len(paths) > self.max_uploads:
            raise DemoError(f"{len(paths)} files uploaded; at most {self.max_uploads} are accepted")
        captions = list(captions or [])
        images = []
        for path in paths:
            shown = path.name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DemoError(f"{shown}: not an image file (accepted: {', '.join(IMAGE_SUFFIXES)})")
            size_mb = path.stat().st_size / 1e6
            if size_mb > self.max_upload_mb:
                raise DemoError(f"{shown}: {size_mb:.1f} MB, over the {self.max_upload_mb:g} MB limit per image")
            try:
                images.append(load_image_rgb(path))
            except ImageLoadError as exc:
                raise DemoError(f"{shown}: {exc}") from exc
        folder = unique_folder(self.root / "uploads", slug(name, "images"))
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for i, image in enumerate(images):
            save_image_atomic(image, tmp / f"image-{i:02d}.png")
            caption = captions[i] if i < len(captions) else ""
            caption = caption if isinstance(caption, str) else ""  # an empty table cell can arrive as NaN
            if caption.strip():
                (tmp / f"image-{i:02d}.txt").write_text(caption.strip() + "\n", encoding="utf-8")
        tmp.rename(folder)
        return folder

    def check_result(self, result: str | None) -> str:
        """``result`` if it is one of :meth:`results` (the only folders the app loads models from)."""
        if not result:
            raise DemoError("pick a trained result (train one first, then Refresh)")
        if str(result) not in {str(p) for p in self.results()}:
            raise DemoError(f"{result} is not a finished result of this app or of outputs/")
        return str(result)

    def results(self) -> list[Path]:
        """Finished trained results: the app's own runs, then the CLI's ``outputs/`` folders."""
        found = []
        for parent in (self.root / "runs", ROOT / "outputs"):
            if parent.is_dir():
                found += sorted(p for p in parent.iterdir() if (p / RECORD_NAME).is_file())
        return found


def build_config(workspace: Workspace, kind: str, identifier: str, class_noun: str, base_model: str,
                 instance_dir: str | Path, run_name: str = "", advanced: dict | None = None,
                 auxiliary_dir: str | Path | None = None):
    """The validated TrainConfig for the Train tab's choices: ``kind``'s preset, the concept, and the advanced
    settings as dotted overrides (blank ones keep the preset's). ``auxiliary_dir``: StyleForge's auxiliary images
    (uploaded); the toy world's presets bring their own. Every folder the run writes lies in the work folder."""
    if kind not in KINDS:
        raise DemoError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    base_model = (base_model or TOY).strip()
    preset = ROOT / KINDS[kind][0 if base_model == TOY else 1]
    output_dir = unique_folder(workspace.root / "runs", slug(run_name or f"{kind}-{identifier}-{class_noun}"))
    text = {"model.pretrained": base_model, "concepts.0.identifier": identifier, "concepts.0.class_noun": class_noun,
            "concepts.0.instance_dir": str(instance_dir), "training.output_dir": str(output_dir)}
    # free text is quoted, so "sks #1" or "true" stay the words typed rather than YAML comments or booleans
    overrides = [f"{key}={json.dumps(value)}" for key, value in text.items()]
    for key, value in (advanced or {}).items():
        if key not in ADVANCED:
            raise DemoError(f"unknown advanced setting {key!r}; settings: {', '.join(ADVANCED)}")
        if value is not None and str(value).strip() != "":
            overrides.append(f"{key}={value}")
    try:
        config = load_config(preset, overrides)
    except ConfigError as exc:
        raise DemoError(str(exc)) from exc
    workspace.inside(Path(config.training.output_dir))
    for concept in config.concepts:
        # checked here, not by the trainer: there it fails only after the model is loaded and class images are made
        if concept.initializer_token and is_vocabulary_word(concept.identifier):
            raise DemoError(f"identifier {concept.identifier!r} is already a word of the CLIP vocabulary, and the "
                            f"{kind} preset on this base model learns the identifier as a new token: type a fresh "
                            f"string such as '<{concept.identifier}>' (and write it in your prompts), or choose kind "
                            "'face' (DreamBooth-LoRA on a rare word such as 'sks', no learned token)")
        if config.method.prior == "class_images":  # generated, so cached in the work folder (per class and model)
            digest = hashlib.sha1(f"{base_model}|{config.data.resolution}".encode()).hexdigest()[:8]
            concept.class_dir = str(workspace.root / "class-images" / f"{slug(concept.class_noun)}-{slug(base_model)}-{digest}")
        elif config.method.prior == "auxiliary":  # read only: the upload, or the toy preset's own folder
            if auxiliary_dir:
                concept.class_dir = str(auxiliary_dir)
            elif concept.class_dir and (ROOT / concept.class_dir).is_dir():
                concept.class_dir = str(ROOT / concept.class_dir)
            else:
                raise DemoError("StyleForge on this base model needs auxiliary images (15-20 pictures in a general "
                                "look of the same medium, e.g. digital paintings of people): upload them under "
                                "'auxiliary images', or set prior preservation to none")
    return config


def config_yaml(config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------------- training


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
        """The trainer's ``logs/progress.jsonl`` lines (steps and validation grids) so far."""
        path = self.output_dir / "logs" / "progress.jsonl"
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
        config_path = job_dir / "config.yaml"
        config_path.write_text(config_yaml(config))
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


# ---------------------------------------------------------------------------------------------------- generation


class Generator:
    """Loads a trained result once (``load_personalized``) and generates from it, with or without FreeCure."""

    def __init__(self):
        self._loaded: tuple[str, object] | None = None
        self._cure: tuple[tuple, object] | None = None  # FreeCure may load a foundation model: built once per choice
        self._lock = threading.Lock()

    def pipeline(self, result: str):
        from t2i_personal import load_personalized

        if self._loaded is None or self._loaded[0] != result:
            self._loaded, self._cure = None, None
            self._loaded = (result, load_personalized(result))
        return self._loaded[1]

    def freecure(self, result: str, attributes: str, mask_source: str):
        from t2i_personal.freecure import FreeCure

        key = (result, attributes, mask_source)
        if self._cure is None or self._cure[0] != key:
            self._cure = (key, FreeCure(self.pipeline(result), attributes=attributes, mask_source=mask_source))
        return self._cure[1]

    def __call__(self, result: str, prompt: str, *, seed: int | None = 0, steps: int = 25, guidance: float = 5.0,
                 lora_scale: float = 1.0, freecure: bool = False, attributes: str = "auto",
                 mask_source: str = "auto") -> dict:
        """``{"personalized", "foundation", "mask", "repaired"}`` images (the last three with FreeCure only)."""
        if not prompt or not prompt.strip():
            raise DemoError("write a prompt, with the identifier, e.g. 'a photo of sks dog on the beach'")
        try:
            with self._lock:
                return self._generate(result, prompt, int(seed or 0), int(steps), float(guidance), float(lora_scale),
                                      freecure, (attributes or "auto").strip(), mask_source or "auto")
        except DemoError:
            raise
        except (ConfigError, ModelLoadError, ImageLoadError, OSError, ValueError, RuntimeError) as exc:
            # what the CLI reports as "error: ...", plus running out of (GPU) memory
            raise DemoError(f"{type(exc).__name__}: {exc}") from exc

    def _generate(self, result, prompt, seed, steps, guidance, lora_scale, freecure, attributes, mask_source) -> dict:
        import torch

        pipe = self.pipeline(result)
        pipe.set_progress_bar_config(disable=True)
        tokens, limit = len(pipe.tokenizer(prompt).input_ids), pipe.tokenizer.model_max_length
        if tokens > limit:
            raise DemoError(f"the prompt is {tokens} tokens long; the text encoder reads at most {limit}: shorten it")
        adapters = pipe.get_active_adapters() if hasattr(pipe, "get_active_adapters") else []
        if adapters:
            pipe.set_adapters(adapters, adapter_weights=[lora_scale] * len(adapters))
        size = pipe._t2i_personal_record.get("config", {}).get("data", {}).get("resolution")
        if not freecure:
            image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            return {"personalized": image}
        out = self.freecure(result, attributes, mask_source)(prompt, seed=seed, num_inference_steps=steps,
                                                             guidance_scale=guidance, height=size, width=size,
                                                             compare=True)
        return {"personalized": out.personalized_images[0],
                "foundation": out.foundation_images[0] if out.foundation_images else None,
                "mask": out.mask[0], "repaired": out.images[0],
                "attributes": ", ".join(f"{a} ({s})" for a, s in out.mask_sources.items()) or "nothing to repair"}


# ---------------------------------------------------------------------------------------------------- evaluation


def run_evaluation(workspace: Workspace, results: list[str], prompt_set: str, pasted: str = "",
                   images_per_prompt: int = 1, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                   progress: bool = True) -> tuple[dict, Path]:
    """``eval/evaluate.py``'s engine on ``results``; returns (summary, output folder with report.html)."""
    from t2i_personal.evaluation.engine import EvalConfig, GenerationOptions, evaluate

    if not results:
        raise DemoError("pick at least one trained result to evaluate")
    results = [workspace.check_result(r) for r in results]
    lines = [line.strip() for line in (pasted or "").splitlines() if line.strip()]
    if prompt_set == "pasted list" and not lines:
        raise DemoError("paste one prompt per line ({V} = identifier, {C} = class noun), or pick a prompt set")
    if prompt_set not in PROMPT_SETS:
        raise DemoError(f"unknown prompt set {prompt_set!r}; choose one of {', '.join(PROMPT_SETS)}")
    out = unique_folder(workspace.root / "evals", time.strftime("eval-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True)
    if prompt_set == "pasted list":
        (out / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        prompt_set = str(out / "prompts.txt")
    cfg = EvalConfig(models=list(results), prompts=prompt_set, images_per_prompt=int(images_per_prompt),
                     seed=int(seed or 0), out=str(out / "results"), progress=progress,
                     generation=GenerationOptions(steps=int(steps), guidance=float(guidance), progress=progress))
    try:
        summary = evaluate(cfg)
    except (ConfigError, ModelLoadError, ImageLoadError, OSError, ValueError, RuntimeError) as exc:
        raise DemoError(f"{type(exc).__name__}: {exc}") from exc
    return summary, out / "results"


def publish_report(workspace: Workspace, results_dir: Path) -> tuple[Path, Path]:
    """The evaluation folder (report.html, its charts and grids, the images, results.csv) put where the app serves
    it, ``downloads/<name>/`` (hard links, so no second copy on disk), and as one zip there; report.html links its
    pictures relatively, so it opens from the served folder. Returns (served report.html, zip)."""
    downloads = workspace.root / "downloads"
    downloads.mkdir(exist_ok=True)
    served = unique_folder(downloads, results_dir.parent.name)
    shutil.copytree(results_dir, served, copy_function=_link_or_copy)
    archive = Path(shutil.make_archive(str(served), "zip", root_dir=results_dir))
    return served / "report.html", archive


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def report_link(report_html: Path) -> str:
    """An HTML link that opens the served report in a new tab (relative to the page, so it survives a proxy)."""
    return (f'<a href="gradio_api/file={urllib.parse.quote(str(report_html))}" target="_blank" '
            'id="eval-report-link">open the HTML report (new tab)</a>')


def summary_table(summary: dict) -> list[list]:
    """Rows of (model, metric, mean, 95% CI) for the metric table."""
    rows = []
    for model, data in summary["models"].items():
        for metric, stats in data["overall"].items():
            mean, low, high = stats.get("mean"), stats.get("ci95_low"), stats.get("ci95_high")
            rows.append([model, metric, None if mean is None else round(mean, 4),
                         "" if low is None else f"{low:.4f} - {high:.4f}"])
    return rows


# ---------------------------------------------------------------------------------------------------------- UI


def progress_bar(step: int, total: int) -> str:
    return (f'<progress value="{step}" max="{max(1, total)}" style="width:100%;height:14px"></progress>'
            f'<div style="text-align:right;font-size:12px">{step} / {total} steps</div>')


def loss_figure(lines: list[dict]):
    from matplotlib.figure import Figure  # not pyplot: the timer and Evaluate draw from different threads

    fig = Figure(figsize=(5, 2.6), tight_layout=True)
    ax = fig.add_subplot()
    steps = [line for line in lines if "loss" in line]
    if steps:
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    return fig


def build_app(workspace: Workspace, queue: TrainingQueue | None = None):
    import gradio as gr

    queue = queue or TrainingQueue(workspace)
    generator = Generator()

    def result_choices():
        return [str(p) for p in workspace.results()]

    def on_config(kind, identifier, class_noun, base, run_name, method, adapter, steps, lr, prior, spl, rank):
        advanced = {k: v for k, v in zip(ADVANCED, (method, adapter, steps, lr, prior, spl, rank))
                    if v not in (None, "", "preset")}
        try:
            config = build_config(workspace, kind, identifier, class_noun, base, "<your uploads>", run_name, advanced)
        except DemoError as exc:
            return f"# {exc}"
        changed = ", ".join(f"{k}={v}" for k, v in advanced.items()) or "none"
        return f"# the {kind} preset; changed under 'advanced': {changed}\n" + config_yaml(config)

    def on_train(files, captions, aux_files, kind, identifier, class_noun, base, run_name, method, adapter, steps, lr,
                 prior, spl, rank):
        try:
            caption_list = [row[1] if len(row) > 1 else "" for row in _rows(captions)]
            folder = workspace.save_uploads(files, caption_list, name=run_name or f"{identifier}-{class_noun}")
            aux = workspace.save_uploads(aux_files, name=f"{folder.name}-auxiliary") if aux_files else None
            advanced = dict(zip(ADVANCED, (method, adapter, steps, lr, prior, spl, rank)))
            config = build_config(workspace, kind, identifier, class_noun, base, folder, run_name,
                                  {k: v for k, v in advanced.items() if v not in (None, "", "preset")}, aux)
            job = queue.submit(config)
        except (DemoError, OSError) as exc:
            raise gr.Error(str(exc)) from exc
        return job.id, f"queued: {job.id}"

    def on_poll(job_id):
        job = queue.jobs.get(job_id or "")
        if job is None:
            return "no training job yet", progress_bar(0, 1), None, None, ""
        lines = job.progress()
        step = max((line["step"] for line in lines if "loss" in line), default=0)
        doing = "preparing (loading the model, class images), step 0" if job.state == "running" and not lines else f"step {step}"
        status = f"{job.state}: {doing}/{job.max_steps}" + (f" - {job.message}" if job.message else "")
        if (position := queue.position(job.id)) is not None:
            status += f" (position {position} in the queue)"
        grid_path = job.latest_grid()
        grid = None
        if grid_path is not None:
            with Image.open(grid_path) as im:  # handed over as pixels: the app serves no work-folder paths
                grid = im.convert("RGB")
        log_tail = job.log_path.read_text(errors="replace")[-2000:] if job.log_path and job.log_path.exists() else ""
        return status, progress_bar(step, job.max_steps), loss_figure(lines), grid, log_tail

    def on_cancel(job_id):
        try:
            return queue.cancel(job_id).state
        except DemoError as exc:
            raise gr.Error(str(exc)) from exc

    def on_resume(job_id):
        try:
            return queue.resume(job_id).state
        except DemoError as exc:
            raise gr.Error(str(exc)) from exc

    def on_generate(result, prompt, seed, steps, guidance, lora_scale, freecure, attributes, mask_source):
        try:
            workspace.check_result(result)
            out = generator(result, prompt, seed=seed, steps=steps, guidance=guidance, lora_scale=lora_scale,
                            freecure=freecure, attributes=attributes, mask_source=mask_source)
        except DemoError as exc:
            raise gr.Error(str(exc)) from exc
        return (out["personalized"], out.get("foundation"), out.get("mask"), out.get("repaired"),
                out.get("attributes", "FreeCure off"))

    def on_evaluate(results, prompt_set, pasted, images_per_prompt, steps, guidance, progress=gr.Progress(track_tqdm=True)):
        try:
            summary, out = run_evaluation(workspace, results, prompt_set, pasted, images_per_prompt, steps=steps,
                                          guidance=guidance)
        except DemoError as exc:
            raise gr.Error(str(exc)) from exc
        rows = summary_table(summary)
        grids = []
        for path in sorted((out / "report" / "grids").rglob("*.png")):  # one grid per model and prompt
            with Image.open(path) as im:
                grids.append((im.convert("RGB"), f"{path.parent.name}: {path.stem}"))
        report_html, archive = publish_report(workspace, out)
        return rows, _chart(rows), grids, report_link(report_html), str(archive)

    with gr.Blocks(title="t2i-personal") as app:
        gr.Markdown("# t2i-personal\nTeach a text-to-image model your subject or style, generate with it (FreeCure "
                    "repairs forgotten attributes), and score the results. On a CPU the default base model is the "
                    "toy world (`builtin:toy`, 64 px); any hub id or local model folder works on a GPU.")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label=f"3-{workspace.max_uploads} images", file_count="multiple",
                                    file_types=["image"], elem_id="train-files")
                    captions = gr.Dataframe(headers=["file", "caption (optional; {V} identifier, {C} class)"],
                                            datatype=["str", "str"], column_count=(2, "fixed"), interactive=True,
                                            label="captions")
                    example = gr.Button("Use the toy world's example dog", size="sm")
                    auxiliary = gr.File(label="auxiliary images (style only: StyleForge's prior; the toy world brings "
                                              "its own)", file_count="multiple", file_types=["image"])
                with gr.Column():
                    kind = gr.Radio(list(KINDS), value="subject", label="what is being trained")
                    with gr.Row():
                        identifier = gr.Textbox("sks", label="identifier",
                                                info="a subject on a real base learns it as a new token: e.g. <sks>")
                        class_noun = gr.Textbox("dog", label="class noun")
                    base = gr.Textbox(TOY, label="base model (builtin:toy on CPU; hub id or local folder on a GPU)")
                    run_name = gr.Textbox("", label="run name (optional)")
                    with gr.Accordion("advanced (blank = the preset's value)", open=False):
                        method = gr.Dropdown(["preset", "dreambooth", "custom_diffusion", "styleforge"],
                                             value="preset", label="method")
                        adapter = gr.Dropdown(["preset", "lora", "full"], value="preset", label="adapter")
                        steps = gr.Textbox("", label="training steps", placeholder="preset", elem_id="train-steps")
                        lr = gr.Textbox("", label="learning rate", placeholder="preset")
                        prior = gr.Dropdown(["preset", "none", "class_images", "auxiliary"], value="preset",
                                            label="prior preservation")
                        spl = gr.Textbox("", label="SPL weight λ (0 = off)", placeholder="preset")
                        rank = gr.Textbox("", label="LoRA rank", placeholder="preset")
                    with gr.Accordion("config (YAML)", open=False):
                        yaml_view = gr.Code(language="yaml", label="resulting config", elem_id="train-yaml")
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
                cancel_btn = gr.Button("Cancel")
                resume_btn = gr.Button("Resume")
            job_id = gr.Textbox(label="job", interactive=False, elem_id="train-job")
            status = gr.Textbox(label="status", interactive=False, elem_id="train-status")
            bar = gr.HTML(progress_bar(0, 1))
            with gr.Row():
                loss_plot = gr.Plot(label="loss")
                grid = gr.Image(label="latest validation grid", type="pil", elem_id="train-grid")
            log = gr.Textbox(label="log (tail)", lines=6, max_lines=12)
            timer = gr.Timer(1.0)

            settings = [kind, identifier, class_noun, base, run_name, method, adapter, steps, lr, prior, spl, rank]
            for component in settings:
                component.change(on_config, settings, yaml_view)
            files.change(caption_rows, [files, captions], captions)
            example.click(lambda: [str(p) for p in sorted(EXAMPLE_IMAGES.glob("*.png"))], None, files)
            train_btn.click(on_train, [files, captions, auxiliary, *settings], [job_id, status], concurrency_limit=1)
            cancel_btn.click(on_cancel, job_id, status)
            resume_btn.click(on_resume, job_id, status)
            timer.tick(on_poll, job_id, [status, bar, loss_plot, grid, log], concurrency_limit=None)
            app.load(on_config, settings, yaml_view)
            app.load(lambda: queue.current() or "", None, job_id)  # a reloaded page follows the job it left

        with gr.Tab("Generate"):
            with gr.Row():
                result = gr.Dropdown(result_choices(), label="trained result", elem_id="gen-result")
                refresh = gr.Button("Refresh", size="sm", elem_id="gen-refresh")
            prompt = gr.Textbox("a photo of sks dog wearing a red hat", label="prompt (with the identifier)")
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0)
                gen_steps = gr.Slider(1, 100, 25, step=1, label="steps")
                cfg_scale = gr.Slider(1, 15, 5, step=0.5, label="CFG")
                lora_scale = gr.Slider(0, 1.5, 1.0, step=0.05, label="LoRA scale")
            with gr.Row():
                freecure = gr.Checkbox(False, label="FreeCure attribute repair", elem_id="gen-freecure")
                attributes = gr.Textbox("auto", label="attributes (auto, or e.g. hair,glasses)")
                mask_source = gr.Dropdown(["auto", "face_parsing", "cross_attention"], value="auto",
                                          label="mask source")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
            with gr.Row():
                personalized = gr.Image(label="personalized", elem_id="gen-personalized")
                foundation = gr.Image(label="foundation")
                mask = gr.Image(label="mask")
                repaired = gr.Image(label="FreeCure", elem_id="gen-repaired")
            repaired_what = gr.Textbox(label="repaired attributes (mask source)", interactive=False)
            refresh.click(lambda: gr.Dropdown(choices=result_choices()), None, result)
            gen_btn.click(on_generate, [result, prompt, seed, gen_steps, cfg_scale, lora_scale, freecure, attributes,
                                        mask_source], [personalized, foundation, mask, repaired, repaired_what],
                          concurrency_limit=1, concurrency_id="model")

        with gr.Tab("Evaluate"):
            with gr.Row():
                eval_results = gr.Dropdown(result_choices(), multiselect=True, label="trained results",
                                           elem_id="eval-results")
                eval_refresh = gr.Button("Refresh", size="sm", elem_id="eval-refresh")
            prompt_set = gr.Radio(list(PROMPT_SETS), value="pasted list", label="prompts")
            pasted = gr.Textbox("a photo of {V} {C}\na photo of {V} {C} on the beach", lines=4,
                                label="pasted prompts, one per line ({V} identifier, {C} class noun)")
            with gr.Row():
                per_prompt = gr.Slider(1, 8, 2, step=1, label="images per prompt")
                eval_steps = gr.Slider(1, 100, 25, step=1, label="steps")
                eval_cfg = gr.Slider(1, 15, 5, step=0.5, label="CFG")
            eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
            table = gr.Dataframe(headers=["model", "metric", "mean", "95% CI"], label="scores", elem_id="eval-table")
            chart = gr.Plot(label="scores")
            gallery = gr.Gallery(label="image grids (model, prompt)", columns=4, elem_id="eval-gallery")
            link = gr.HTML("")
            report = gr.File(label="HTML report, with its images and results.csv (zip)")
            eval_refresh.click(lambda: gr.Dropdown(choices=result_choices()), None, eval_results)
            eval_btn.click(on_evaluate, [eval_results, prompt_set, pasted, per_prompt, eval_steps, eval_cfg],
                           [table, chart, gallery, link, report], concurrency_limit=1, concurrency_id="model")
    return app


def _rows(frame) -> list[list]:
    if frame is None:
        return []
    if hasattr(frame, "values"):  # a pandas DataFrame
        return frame.values.tolist()
    return list(frame.get("data", [])) if isinstance(frame, dict) else list(frame)


def _chart(rows: list[list]):
    from matplotlib.figure import Figure

    metrics = sorted({r[1] for r in rows})
    models = sorted({r[0] for r in rows})
    fig = Figure(figsize=(6, 3), tight_layout=True)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [next((r[2] or 0 for r in rows if r[0] == model and r[1] == m), 0) for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=Path(model).name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.legend(fontsize=7)
    return fig


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # gradio then closes its server and main() returns, so the atexit handlers run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs --auth)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help="log-in required for every visitor; needed with --share or a non-local --host")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "demo"), help="where the app writes everything")
    parser.add_argument("--max-uploads", type=int, default=20)
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    args = parser.parse_args(argv)
    local = args.host in ("127.0.0.1", "localhost", "::1")
    if (args.share or not local) and not args.auth:
        parser.error("--share and a non-local --host let others train and generate on this machine: add "
                     "--auth USER:PASSWORD")
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if auth is not None and len(auth) != 2:
        parser.error("--auth expects USER:PASSWORD")
    workspace = Workspace(Path(args.workdir), args.max_uploads, args.max_upload_mb)
    # Gradio keeps what pages upload (any file type, through its upload route) and the pictures it sends them in a
    # folder of its own, by default in the system's temp folder, where they outlive the app. Here that folder is in
    # the work folder, emptied at start (what a killed app left) and at exit. Gradio reads the variable when the app
    # is built and launched.
    gradio_files = workspace.root / "gradio-temp"
    shutil.rmtree(gradio_files, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_files)
    atexit.register(shutil.rmtree, gradio_files, ignore_errors=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` or a service manager stops the app as Ctrl-C does
    queue = TrainingQueue(workspace)
    atexit.register(queue.stop_all)  # a running training stops with a checkpoint when the app does
    app = build_app(workspace, queue)
    print(f"t2i-personal demo: http://{args.host}:{args.port}  (work folder {workspace.root})", flush=True)
    # Served paths: the example images and the evaluation zips only; other pictures are sent as pixels.
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        max_file_size=f"{args.max_upload_mb:g}mb", allowed_paths=[str(EXAMPLE_IMAGES), str(workspace.root / "downloads")],
        blocked_paths=[str(workspace.root / sub) for sub in ("uploads", "jobs", "runs", "class-images", "evals")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
