"""Quality gates of the shipped toy-world models; prints each figure, its threshold and the verdict.

    python benchmarks/toyworld_gates.py [--out outputs/gates] [--n-generations 78] [--device cpu]
    python benchmarks/toyworld_gates.py --model builtin:toy-flux --out outputs/gates-flux   # its generator gates

Writes the held-out generations (a grid) and the oracle's reading of each prompt next to ``gates.json``.
Exit status 1 if any gate fails. Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from t2i_personal.toyworld.gates import THRESHOLDS, run_gates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/gates"))
    parser.add_argument("--n-generations", type=int, default=78)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="builtin:toy", help="the generator: builtin:toy or builtin:toy-flux")
    args = parser.parse_args()
    started = time.perf_counter()
    metrics = run_gates(n_generations=args.n_generations, n_eval=args.n_eval, seed=args.seed, device=args.device,
                        out_dir=args.out, model=args.model)
    seconds = time.perf_counter() - started
    print(f"{'gate':30s} {'value':>8s} {'threshold':>10s}  verdict")
    for key in metrics["passed"]:
        print(f"{key:30s} {metrics[key]:8.3f} {THRESHOLDS[key]:10.2f}  {'pass' if metrics['passed'][key] else 'FAIL'}")
    print(f"({seconds:.0f} s; generations and prompts in {args.out})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gates.json").write_text(json.dumps({**metrics, "seconds": seconds}, indent=2) + "\n")
    return 0 if all(metrics["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
