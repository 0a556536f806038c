"""The Gradio demo, ``python demo/app.py``: train, generate (with FreeCure) and evaluate in the browser, through
the same library code as the command lines.

``app`` starts it and lays out the page; ``tabs/`` holds one builder per tab. What the tabs call: ``workspace``
(the work folder and the uploads), ``configs`` (the Train tab's presets and settings), ``jobs`` (the training
queue), ``generator`` (a loaded result, with or without FreeCure), ``evaluation`` (the evaluator and its report),
``charts``.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: presets, train/train.py, outputs/
