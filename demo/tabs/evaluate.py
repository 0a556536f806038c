"""The Evaluate tab: score trained results over a prompt set (a built-in one or a pasted list), shown as a table,
a chart and image grids, with the HTML report to open or download."""

from __future__ import annotations

from ..charts import score_chart
from ..evaluation import PROMPT_SETS, publish_report, report_link, run_evaluation, summary_table
from ..workspace import Workspace
from . import as_toast, pixels, result_picker


def build_evaluate_tab(workspace: Workspace) -> None:
    import gradio as gr

    @as_toast()
    def on_evaluate(results, prompt_set, pasted, images_per_prompt, steps, guidance,
                    progress=gr.Progress(track_tqdm=True)):
        summary, out = run_evaluation(workspace, results, prompt_set, pasted, images_per_prompt, steps=steps,
                                      guidance=guidance)
        rows = summary_table(summary)
        grids = [(pixels(path), f"{path.parent.name}: {path.stem}")  # one grid per model and prompt
                 for path in sorted((out / "report" / "grids").rglob("*.png"))]
        report_html, archive = publish_report(workspace, out)
        return rows, score_chart(rows), grids, report_link(report_html), str(archive)

    with gr.Tab("Evaluate"):
        results = result_picker(workspace, "trained results", "eval-results", "eval-refresh", multiselect=True)
        prompt_set = gr.Radio(list(PROMPT_SETS), value="pasted list", label="prompts")
        pasted = gr.Textbox("a photo of {V} {C}\na photo of {V} {C} on the beach", lines=4,
                            label="pasted prompts, one per line ({V} identifier, {C} class noun)")
        with gr.Row():
            per_prompt = gr.Slider(1, 8, 2, step=1, label="images per prompt")
            steps = gr.Slider(1, 100, 25, step=1, label="steps")
            cfg_scale = gr.Slider(1, 15, 5, step=0.5, label="CFG")
        eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
        table = gr.Dataframe(headers=["model", "metric", "mean", "95% CI"], label="scores", elem_id="eval-table")
        chart = gr.Plot(label="scores")
        gallery = gr.Gallery(label="image grids (model, prompt)", columns=4, elem_id="eval-gallery")
        link = gr.HTML("")
        report = gr.File(label="HTML report, with its images and results.csv (zip)")
    eval_btn.click(on_evaluate, [results, prompt_set, pasted, per_prompt, steps, cfg_scale],
                   [table, chart, gallery, link, report], concurrency_limit=1, concurrency_id="model")
