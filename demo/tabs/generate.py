"""The Generate tab: a trained result, a prompt and the sampling settings, optionally FreeCure's attribute repair;
shows the personalized image and, with FreeCure, the foundation image, the mask and the repaired image."""

from __future__ import annotations

from ..generator import Generator
from ..workspace import Workspace
from . import as_toast, result_picker


def build_generate_tab(workspace: Workspace, generator: Generator) -> None:
    import gradio as gr

    @as_toast()
    def on_generate(result, prompt, seed, steps, guidance, lora_scale, freecure, attributes, mask_source, omega):
        workspace.check_result(result)
        out = generator(result, prompt, seed=seed, steps=steps, guidance=guidance, lora_scale=lora_scale,
                        freecure=freecure, attributes=attributes, mask_source=mask_source, omega=omega)
        return (out["personalized"], out.get("foundation"), out.get("mask"), out.get("repaired"),
                out.get("attributes", "FreeCure off"))

    with gr.Tab("Generate"):
        result = result_picker(workspace, "trained result", "gen-result", "gen-refresh")
        prompt = gr.Textbox("a photo of sks dog wearing a red hat", label="prompt (with the identifier)")
        with gr.Row():
            seed = gr.Number(0, label="seed", precision=0)
            steps = gr.Slider(1, 100, 25, step=1, label="steps")
            cfg_scale = gr.Slider(1, 15, 5, step=0.5, label="CFG")
            lora_scale = gr.Slider(0, 1.5, 1.0, step=0.05, label="LoRA scale")
        with gr.Row():
            freecure = gr.Checkbox(False, label="FreeCure attribute repair", elem_id="gen-freecure")
            attributes = gr.Textbox("auto", label="attributes (auto, or e.g. hair,glasses)")
            mask_source = gr.Dropdown(["auto", "face_parsing", "cross_attention"], value="auto", label="mask source")
            omega = gr.Number(None, label="FreeCure ω (blank = model default)", minimum=0, elem_id="gen-omega")
        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
        with gr.Row():
            personalized = gr.Image(label="personalized", elem_id="gen-personalized")
            foundation = gr.Image(label="foundation")
            mask = gr.Image(label="mask")
            repaired = gr.Image(label="FreeCure", elem_id="gen-repaired")
        repaired_what = gr.Textbox(label="repaired attributes (mask source)", interactive=False)
    gen_btn.click(on_generate, [result, prompt, seed, steps, cfg_scale, lora_scale, freecure, attributes,
                                mask_source, omega], [personalized, foundation, mask, repaired, repaired_what],
                  concurrency_limit=1, concurrency_id="model")
