"""The Train tab: upload images (with optional captions), say what is trained on which base model, queue the run,
and follow it (status, progress bar, loss, latest validation grid, log tail); Cancel and Resume."""

from __future__ import annotations

from t2i_personal.methods import METHODS

from .. import ROOT
from ..charts import loss_figure, progress_bar
from ..configs import ADVANCED, KINDS, TOY, build_config, chosen_advanced, config_yaml
from ..errors import DemoError
from ..jobs import TrainingQueue
from ..workspace import Workspace, upload_path
from . import as_toast, pixels

EXAMPLE_IMAGES = ROOT / "t2i_personal" / "toyworld" / "assets" / "subjects" / "dog"


def table_rows(frame) -> list[list]:
    """A gradio Dataframe's value as a list of rows, whichever form it arrives in."""
    if frame is None:
        return []
    if hasattr(frame, "values"):  # a pandas DataFrame
        return frame.values.tolist()
    return list(frame.get("data", [])) if isinstance(frame, dict) else list(frame)


def caption_rows(files, captions) -> list[list[str]]:
    """The caption table for the uploaded files, in upload order; a caption already typed for a file name is kept
    when files are added or removed."""
    typed = {row[0]: row[1] for row in table_rows(captions)
             if len(row) > 1 and isinstance(row[1], str) and row[1].strip()}
    names = [upload_path(f).name for f in (files or [])]
    return [[name, typed.get(name, "")] for name in names]


class TrainEvents:
    """The tab's callbacks, on the app's work folder and training queue. ``settings`` arrive in the order kind,
    identifier, class noun, base model, run name, then the advanced ones in :data:`ADVANCED` order."""

    def __init__(self, workspace: Workspace, queue: TrainingQueue):
        self.workspace, self.queue = workspace, queue

    def show_config(self, kind, identifier, class_noun, base, run_name, *advanced_values) -> str:
        advanced = chosen_advanced(advanced_values)
        try:
            config = build_config(self.workspace, kind, identifier, class_noun, base, "<your uploads>", run_name,
                                  advanced)
        except DemoError as exc:
            return f"# {exc}"
        changed = ", ".join(f"{k}={v}" for k, v in advanced.items()) or "none"
        return f"# the {kind} preset; changed under 'advanced': {changed}\n" + config_yaml(config)

    @as_toast(DemoError, OSError)
    def train(self, files, captions, aux_files, kind, identifier, class_noun, base, run_name, *advanced_values):
        caption_list = [row[1] if len(row) > 1 else "" for row in table_rows(captions)]
        folder = self.workspace.save_uploads(files, caption_list, name=run_name or f"{identifier}-{class_noun}")
        aux = self.workspace.save_uploads(aux_files, name=f"{folder.name}-auxiliary") if aux_files else None
        config = build_config(self.workspace, kind, identifier, class_noun, base, folder, run_name,
                              chosen_advanced(advanced_values), aux)
        job = self.queue.submit(config)
        return job.id, f"queued: {job.id}"

    def poll(self, job_id):
        """(status, progress bar, loss plot, latest validation grid, log tail) of the job the page follows."""
        job = self.queue.jobs.get(job_id or "")
        if job is None:
            return "no training job yet", progress_bar(0, 1), None, None, ""
        lines = job.progress()
        step = max((line["step"] for line in lines if "loss" in line), default=0)
        preparing = job.state == "running" and not lines
        doing = "preparing (loading the model, class images), step 0" if preparing else f"step {step}"
        status = f"{job.state}: {doing}/{job.max_steps}" + (f" - {job.message}" if job.message else "")
        if (position := self.queue.position(job.id)) is not None:
            status += f" (position {position} in the queue)"
        grid_path = job.latest_grid()
        grid = None if grid_path is None else pixels(grid_path)
        log_tail = job.log_path.read_text(errors="replace")[-2000:] if job.log_path and job.log_path.exists() else ""
        return status, progress_bar(step, job.max_steps), loss_figure(lines), grid, log_tail

    @as_toast()
    def cancel(self, job_id):
        return self.queue.cancel(job_id).state

    @as_toast()
    def resume(self, job_id):
        return self.queue.resume(job_id).state


def build_train_tab(app, workspace: Workspace, queue: TrainingQueue) -> None:
    import gradio as gr

    events = TrainEvents(workspace, queue)
    with gr.Tab("Train"):
        with gr.Row():
            with gr.Column():
                files, captions, auxiliary = _uploads(workspace)
            with gr.Column():
                settings, yaml_view = _settings()
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

    for component in settings:
        component.change(events.show_config, settings, yaml_view)
    train_btn.click(events.train, [files, captions, auxiliary, *settings], [job_id, status], concurrency_limit=1)
    cancel_btn.click(events.cancel, job_id, status)
    resume_btn.click(events.resume, job_id, status)
    timer.tick(events.poll, job_id, [status, bar, loss_plot, grid, log], concurrency_limit=None)
    app.load(events.show_config, settings, yaml_view)
    app.load(lambda: queue.current() or "", None, job_id)  # a reloaded page follows the job it left


def _uploads(workspace: Workspace):
    """The images, their caption table, the example button and the auxiliary images: (files, captions, aux)."""
    import gradio as gr

    files = gr.File(label=f"3-{workspace.max_uploads} images", file_count="multiple", file_types=["image"],
                    elem_id="train-files")
    captions = gr.Dataframe(headers=["file", "caption (optional; {V} identifier, {C} class)"],
                            datatype=["str", "str"], column_count=(2, "fixed"), interactive=True, label="captions")
    example = gr.Button("Use the toy world's example dog", size="sm")
    auxiliary = gr.File(label="auxiliary images (style only: StyleForge's prior; the toy world brings its own)",
                        file_count="multiple", file_types=["image"])
    files.change(caption_rows, [files, captions], captions)
    example.click(lambda: [str(p) for p in sorted(EXAMPLE_IMAGES.glob("*.png"))], None, files)
    return files, captions, auxiliary


def _settings():
    """What is trained and how, in :class:`TrainEvents`' settings order, and the resulting YAML's view."""
    import gradio as gr

    kind = gr.Radio(list(KINDS), value="subject", label="what is being trained")
    with gr.Row():
        identifier = gr.Textbox("sks", label="identifier",
                                info="a subject on a real base learns it as a new token: e.g. <sks>")
        class_noun = gr.Textbox("dog", label="class noun")
    base = gr.Textbox(TOY, label="base model (builtin:toy on CPU; hub id or local folder on a GPU)")
    run_name = gr.Textbox("", label="run name (optional)")
    with gr.Accordion("advanced (blank = the preset's value)", open=False):
        advanced = [  # in ADVANCED's order
            gr.Dropdown(["preset", *METHODS], value="preset", label="method"),
            gr.Dropdown(["preset", "lora", "loha", "lokr", "full"], value="preset", label="adapter"),
            gr.Textbox("", label="training steps", placeholder="preset", elem_id="train-steps"),
            gr.Textbox("", label="learning rate", placeholder="preset"),
            gr.Dropdown(["preset", "none", "class_images", "auxiliary"], value="preset", label="prior preservation"),
            gr.Textbox("", label="SPL weight λ (0 = off)", placeholder="preset"),
            gr.Textbox("", label="LoRA rank", placeholder="preset"),
        ]
    assert len(advanced) == len(ADVANCED)
    with gr.Accordion("config (YAML)", open=False):
        yaml_view = gr.Code(language="yaml", label="resulting config", elem_id="train-yaml")
    return [kind, identifier, class_noun, base, run_name, *advanced], yaml_view
