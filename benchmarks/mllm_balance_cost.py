"""Cost of MLLM balancing on the tiny LLaVA twin (CPU, 1 thread): step time of every MLLM method relative to its
plain run (`mllm_contrast`, `mllm_ogm`, `rollingq` after its rotation: plain; `commit`: plain with the projector
trained, which CoMMIT needs; IMoD: plain LoRA), RollingQ's per-rotation estimation pass, and the per-modality
diagnostics (`eval.diagnostics_max_samples`) as a fraction of one training epoch.

Every method trains through the loop's own `Trainer.training_step` on the same batches (taken from the plain
run's train loader, so data loading is excluded); rounds alternate between the methods so a load change on a
shared machine hits all alike; the median over rounds is reported. The epoch time is the plain run's median step
time times its optimizer steps per epoch (the recipe's sizes: 600 training samples, batch 16).

    python benchmarks/mllm_balance_cost.py --rounds 5 --steps 8 --adapter moka --caps 16,64
writes benchmarks/results/mllm_balance_cost_<adapter>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# name -> (recipe changes, the plain run it is compared with)
PROJ = {"model": {"freeze": {"tower": True, "projector": False, "language_model": True}}}
METHODS = {
    "none": ({"balance": {"method": "none"}}, "none"),
    "mllm_contrast": ({"balance": {"method": "mllm_contrast", "weight": 0.1}}, "none"),
    "mllm_ogm": ({"balance": {"method": "mllm_ogm", "alpha": 0.8}}, "none"),
    "mllm_contrast every 4": ({"balance": {"method": "mllm_contrast", "weight": 0.1, "every_n_steps": 4}}, "none"),
    "mllm_ogm every 4": ({"balance": {"method": "mllm_ogm", "alpha": 0.8, "every_n_steps": 4}}, "none"),
    "rollingq (after a rotation)": ({"balance": {"method": "rollingq", "r_time": 1}}, "none"),
    "none, projector trained": ({"balance": {"method": "none"}, **PROJ}, "none, projector trained"),
    "commit": ({"balance": {"method": "commit"}, **PROJ}, "none, projector trained"),
    "commit measure every 4": ({"balance": {"method": "commit", "measure_every": 4}, **PROJ},
                               "none, projector trained"),
    "lora": ({"adapter": "lora", "balance": {"method": "none"}}, "lora"),
    "imod": ({"adapter": "imod", "balance": {"method": "none"}}, "lora"),
}


def recipe(work: str, name: str, adapter: str, changes: dict, cap: int) -> dict:
    raw = {
        "task": "sft", "output_dir": os.path.join(work, name), "adapter": adapter,
        "adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "model": {"name_or_path": os.path.join(work, "tiny_llava"), "build_tiny": "llava"},
        "data": {"train": os.path.join(work, "data", "train.json"),
                 "validation": os.path.join(work, "data", "validation.json"),
                 "max_length": 128, "cache_dir": os.path.join(work, "cache"),
                 "generate": {"modalities": ["image"], "n_train": 600, "n_validation": 100, "n_test": 8, "seed": 0}},
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
                  "learning_rate": 3e-3, "progress": False, "logging_steps": 1000},
        "eval": {"diagnostics_max_samples": cap},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="training steps per method and round")
    p.add_argument("--adapter", default="moka", choices=("moka", "lora"))
    p.add_argument("--caps", default="16,64", help="eval.diagnostics_max_samples values to time, comma-separated")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from mmbalance_llm.train.trainer import Trainer

    work = tempfile.mkdtemp(prefix="mllm_cost_")
    caps = [int(c) for c in args.caps.split(",")]
    name = lambda m: "".join(c if c.isalnum() else "_" for c in m)  # noqa: E731
    trainers = {m: Trainer(recipe(work, name(m), args.adapter, ch, caps[0])) for m, (ch, _) in METHODS.items()}
    plain = trainers["none"]
    # RollingQ costs nothing per step until its first rotation; rotate once (its epoch-end estimation pass over
    # the training split, timed) so the timed steps include the rotation of the answer queries
    rq = trainers["rollingq (after a rotation)"]
    tick = time.perf_counter()
    rq.balancer.on_epoch_end(rq.model, 0)
    rotation_pass = time.perf_counter() - tick
    it = iter(plain.train_loader)
    batches = [next(it) for _ in range(args.steps)]
    times = {m: [] for m in METHODS}
    diag = {c: [] for c in caps}
    for _ in range(args.rounds):
        for m, tr in trainers.items():
            tr.training_step(batches[0])  # warm-up step, not timed
            tick = time.perf_counter()
            for b in batches:  # --steps a multiple of 4: "every 4" measures on exactly a quarter of them
                tr.training_step(b)
            times[m].append((time.perf_counter() - tick) / len(batches))
        for cap in caps:
            plain.task.recipe.eval.diagnostics_max_samples, plain.task._diag_batches = cap, None
            plain.task.diagnostics(plain.model)  # encodes the capped subset once (cached by the task)
            tick = time.perf_counter()
            plain.task.diagnostics(plain.model)
            diag[cap].append(time.perf_counter() - tick)
    med = {m: statistics.median(v) for m, v in times.items()}
    epoch = med["none"] * plain.steps_per_epoch
    diag_s = {c: statistics.median(v) for c, v in diag.items()}
    res = {"adapter": args.adapter, "rounds": args.rounds, "steps": args.steps, "batch_size": 16,
           "steps_per_epoch": plain.steps_per_epoch, "step_seconds": med,
           "step_ratio": {m: med[m] / med[METHODS[m][1]] for m in med}, "epoch_seconds": epoch,
           "rollingq_estimation_pass_seconds": rotation_pass,
           "diagnostics_seconds": diag_s, "diagnostics_fraction_of_epoch": {c: v / epoch for c, v in diag_s.items()}}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"mllm_balance_cost_{args.adapter}")
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    lines = [f"Tiny LLaVA + {args.adapter}, CPU 1 thread, batch 16, median of {args.rounds} rounds x {args.steps} steps.",
             "", "| method | step (s) | plain run | ratio to plain |", "|---|---|---|---|"]
    lines += [f"| {m} | {med[m]:.4f} | {METHODS[m][1]} | {res['step_ratio'][m]:.2f}x |" for m in med]
    lines += ["", f"RollingQ's estimation pass (once per rotation, over the 600 training samples): {rotation_pass:.2f} s "
              f"= {100 * rotation_pass / epoch:.0f}% of a plain epoch."]
    lines += ["", f"Diagnostics per validation, as a fraction of a {plain.steps_per_epoch}-step epoch "
              f"({epoch:.2f} s):", "",
              "| diagnostics_max_samples | seconds | fraction of an epoch |", "|---|---|---|"]
    lines += [f"| {c} | {diag_s[c]:.3f} | {100 * diag_s[c] / epoch:.1f}% |" for c in caps]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
