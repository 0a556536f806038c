"""The page's tabs, one builder each (``train``, ``generate``, ``evaluate``), and what they share."""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import Image

from ..errors import DemoError
from ..workspace import Workspace


def pixels(path: Path) -> Image.Image:
    """An image of the work folder handed to the page as pixels: the app serves no work-folder paths."""
    with Image.open(path) as im:
        return im.convert("RGB")


def result_picker(workspace: Workspace, label: str, elem_id: str, refresh_id: str, multiselect: bool = False):
    """A dropdown of the finished results and its Refresh button (results finished since the page opened)."""
    import gradio as gr

    def choices():
        return [str(p) for p in workspace.results()]

    with gr.Row():
        picker = gr.Dropdown(choices(), multiselect=multiselect, label=label, elem_id=elem_id)
        refresh = gr.Button("Refresh", size="sm", elem_id=refresh_id)
    refresh.click(lambda: gr.Dropdown(choices=choices()), None, picker)
    return picker


def as_toast(*errors: type[Exception]):
    """A callback decorator: ``errors`` (default :class:`DemoError`) reach the page as an error toast with their
    message, not as gradio's generic "Error"."""
    errors = errors or (DemoError,)

    def decorate(fn):
        @functools.wraps(fn)  # gradio reads the signature (inputs, gr.Progress) through the wrapper
        def callback(*args, **kwargs):
            import gradio as gr

            try:
                return fn(*args, **kwargs)
            except errors as exc:
                raise gr.Error(str(exc)) from exc
        return callback
    return decorate
