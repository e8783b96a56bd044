"""Training-time cost of every registered method, as a ratio to `none`, robust to a shared machine.

One process builds a Trainer per method on the same data and recipe, then trains them in interleaved
rounds: round r runs epoch r of every method back to back (the method's own epoch hooks included:
prototypes, re-initialisation, valuation, teacher or blending passes; validation excluded). A load change
on the machine therefore hits every method alike. The ratio is the method's total training time over
`none`'s; with --repeats the whole measurement is repeated with fresh trainers and the median ratio
(with its min-max range) is reported. Single-threaded. Writes benchmarks/results/train_cost.{json,md}; balance_synthetic.py uses it
for its "train time ×" column.

    python benchmarks/train_cost.py --epochs 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(key, "1")


def main(argv=None) -> int:
    import torch

    from mmbalance_llm.balance import available_methods, method_class
    from mmbalance_llm.config import apply_overrides, read_yaml, recipe_from_dict
    from mmbalance_llm.data.synthetic import ensure_preset
    from mmbalance_llm.train.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="av_imbalance")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--methods", default="all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "train_cost"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    methods = ([m for m in available_methods() if "classify" in method_class(m).tasks]  # sft-only: mllm_*
               if args.methods == "all" else args.methods.split(","))
    methods = ["none"] + [m for m in methods if m != "none"]
    data = ensure_preset(os.path.join(args.work_dir, "data", args.preset), preset=args.preset)
    def build(m):
        recipe = os.path.join(ROOT, "recipes", "synthetic", f"{m}.yaml")
        raw = read_yaml(recipe if os.path.isfile(recipe) else os.path.join(ROOT, "recipes", "synthetic", "baseline.yaml"))
        raw = apply_overrides(raw, [f"data.path={data}", f"output_dir={tempfile.mkdtemp(dir=args.work_dir)}",
                                    f"balance.method={m}", f"train.epochs={args.epochs}", "train.progress=false"])
        return Trainer(recipe_from_dict(raw))

    repeats = []
    for rep in range(args.repeats):
        trainers = {m: build(m) for m in methods}
        seconds = {m: [] for m in methods}
        for epoch in range(args.epochs):
            for m, trainer in trainers.items():
                tick = time.perf_counter()
                trainer.train_epoch(epoch)
                seconds[m].append(time.perf_counter() - tick)
        repeats.append(seconds)
        print(f"[train_cost] repeat {rep + 1}/{args.repeats}: none {sum(seconds['none']):.2f} s", flush=True)
    per_repeat = {m: sorted(sum(r[m]) / sum(r["none"]) for r in repeats) for m in methods}
    ratios = {m: v[len(v) // 2] for m, v in per_repeat.items()}
    base = statistics.median(sum(r["none"]) for r in repeats)
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_cost.json"), "w", encoding="utf-8") as fh:
        json.dump({"preset": args.preset, "epochs": args.epochs, "repeats": args.repeats, "ratio": ratios,
                   "per_repeat_ratio": per_repeat, "seconds": repeats}, fh, indent=1)
    lines = [f"Training time of {args.epochs} interleaved epochs on `{args.preset}` (recipe defaults, 1 thread), "
             f"ratio to `none` ({base:.1f} s); median of {args.repeats} repeats with fresh trainers, and the range.\n",
             "| method | train time × | range over repeats |", "|---|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {ratios[m]:.2f} | {per_repeat[m][0]:.2f}–{per_repeat[m][-1]:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "train_cost.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
