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
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing: finds demo/

from demo import ROOT  # noqa: E402
from demo.generator import Generator  # noqa: E402
from demo.jobs import TrainingQueue  # noqa: E402
from demo.tabs.evaluate import build_evaluate_tab  # noqa: E402
from demo.tabs.generate import build_generate_tab  # noqa: E402
from demo.tabs.train import EXAMPLE_IMAGES, build_train_tab  # noqa: E402
from demo.workspace import Workspace  # noqa: E402


def build_app(workspace: Workspace, queue: TrainingQueue | None = None):
    import gradio as gr

    with gr.Blocks(title="t2i-personal") as app:
        gr.Markdown("# t2i-personal\nTeach a text-to-image model your subject or style, generate with it (FreeCure "
                    "repairs forgotten attributes), and score the results. On a CPU the default base model is the "
                    "toy world (`builtin:toy`, 64 px); any hub id or local model folder works on a GPU.")
        build_train_tab(app, workspace, queue or TrainingQueue(workspace))
        build_generate_tab(workspace, Generator())
        build_evaluate_tab(workspace)
    return app


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # gradio then closes its server and main() returns, so the atexit handlers run


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    args.auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.auth is not None and len(args.auth) != 2:
        parser.error("--auth expects USER:PASSWORD")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
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
        server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
        max_file_size=f"{args.max_upload_mb:g}mb", allowed_paths=[str(EXAMPLE_IMAGES), str(workspace.root / "downloads")],
        blocked_paths=[str(workspace.root / sub) for sub in ("uploads", "jobs", "runs", "class-images", "evals")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
