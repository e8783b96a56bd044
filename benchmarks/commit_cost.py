"""Cost of CoMMIT (`balance.method: commit`) on the tiny LLaVA twin with a trainable projector (CPU, 1 thread): step
time relative to the plain run with the same trainable parts, measuring kappa on every step and on every 4th.

The same protocol as benchmarks/mllm_balance_cost.py (its recipe, plus `model.freeze.projector: false`): every
method trains through the loop's own `Trainer.training_step` on the same batches, rounds alternate between the
methods, the median over rounds is reported.

    python benchmarks/commit_cost.py --rounds 5 --steps 8 --adapter moka
writes benchmarks/results/commit_cost_<adapter>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mllm_balance_cost import recipe as base_recipe  # noqa: E402

METHODS = {"none": {"method": "none"}, "commit": {"method": "commit"},
           "commit measure_every 4": {"method": "commit", "measure_every": 4, "lr_update_every": 4},
           "commit aux_weight 0": {"method": "commit", "aux_weight": 0.0}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="training steps per method and round (a multiple of 4)")
    p.add_argument("--adapter", default="moka", choices=("moka", "lora"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from mmbalance_llm.train.trainer import Trainer

    work = tempfile.mkdtemp(prefix="commit_cost_")
    trainers = {}
    for m, b in METHODS.items():
        raw = base_recipe(work, m.replace(" ", "_"), args.adapter, b, 16)
        raw["model"]["freeze"] = {"projector": False}
        trainers[m] = Trainer(raw)
    it = iter(trainers["none"].train_loader)
    batches = [next(it) for _ in range(args.steps)]
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m, tr in trainers.items():
            tr.training_step(batches[0])  # warm-up step (and the first snapshot), not timed
            tick = time.perf_counter()
            for b in batches:
                tr.training_step(b)
            times[m].append((time.perf_counter() - tick) / len(batches))
    med = {m: statistics.median(v) for m, v in times.items()}
    res = {"adapter": args.adapter, "rounds": args.rounds, "steps": args.steps, "batch_size": 16,
           "step_seconds": med, "step_ratio": {m: med[m] / med["none"] for m in med}}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"commit_cost_{args.adapter}")
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    lines = [f"Tiny LLaVA + {args.adapter} + trainable projector, CPU 1 thread, batch 16, median of {args.rounds} "
             f"rounds x {args.steps} steps.", "", "| method | step (s) | ratio to plain |", "|---|---|---|"]
    lines += [f"| {m} | {med[m]:.4f} | {res['step_ratio'][m]:.2f}x |" for m in med]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
