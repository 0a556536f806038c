"""Train a personalized model.

    accelerate launch train/train.py --config configs/quickstart.yaml [key.sub=value ...]

(plain ``python train/train.py ...`` works too on one device). See README.md for every config key.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t2i_personal.config import load_config  # noqa: E402
from t2i_personal.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_train_steps=200")
    args = parser.parse_args(argv)
    # Ctrl-C / SIGTERM before the trainer exists (imports, model loading) is remembered, not lost: the run then
    # stops after its first step with a checkpoint, like a later one.
    early_stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: early_stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        for override in args.overrides:
            logging.info("override: %s", override)
        from t2i_personal.record import RECORD_NAME
        from t2i_personal.training.trainer import Trainer, stop_on_signals

        trainer = Trainer(config)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if early_stop.is_set():
            trainer.request_stop()
        with stop_on_signals(trainer):
            out = trainer.train()
    except (UserError, FileNotFoundError) as exc:  # FileNotFoundError: a missing file found below the config layer
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (out / RECORD_NAME).exists():  # stopped early (Ctrl-C / SIGTERM / training.stop_after_step)
        print(f"stopped: resumable checkpoint in {out}/checkpoints/; continue with the same command plus "
              "training.resume=latest", file=sys.stderr)
        return 130 if trainer.stop_requested.is_set() else 0
    print(f"done: results in {out}/ (validation grids in {out}/validation/, load with "
          f"t2i_personal.load_personalized('{out}'))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
