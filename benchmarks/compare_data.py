"""Dataset reads in `mmbalance compare`: one shared read per process (compare.shared_data) against one read
per run (before), counted and timed inside `load_feature_data`, with the compare's wall time.

The default compare (none, unimodal_aux, ogm_ge and each modality alone: 5 runs) on the `av_imbalance`
preset, in this process (jobs 1), single-threaded, the two variants alternating over rounds.

    python benchmarks/compare_data.py --rounds 2 --epochs 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(key, "1")


def main(argv=None) -> int:
    import torch

    from bench_utils import write_result
    from mmbalance_llm import compare
    from mmbalance_llm.config import DataConfig
    from mmbalance_llm.data import features
    from mmbalance_llm.data.synthetic import ensure_preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rows", type=int, default=None, help="training rows (default: the preset's)")
    p.add_argument("--preset", default="av_imbalance")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compare_data"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench_compare_")
    sizes = {} if args.rows is None else dict(train_size=args.rows, validation_size=args.rows // 10,
                                              test_size=args.rows // 10)
    data = ensure_preset(os.path.join(work, "data"), preset=args.preset, **sizes)

    real_load, real_shared = features.load_feature_data, compare.shared_data
    spent = {"calls": 0, "seconds": 0.0}

    def timed_load(*a, **kw):
        tick = time.perf_counter()
        try:
            return real_load(*a, **kw)
        finally:
            spent["calls"] += 1
            spent["seconds"] += time.perf_counter() - tick

    features.load_feature_data = timed_load
    variants = {"one read per run (before)": lambda recipe: None, "one shared read (compare.shared_data)": real_shared}
    results = {name: [] for name in variants}
    for r in range(args.rounds):
        names = list(variants)[r % 2:] + list(variants)[: r % 2]
        for name in names:
            compare.shared_data = variants[name]
            spent.update(calls=0, seconds=0.0)
            tick = time.perf_counter()
            compare.run_compare(os.path.join(work, f"cmp{r}-{len(results[name])}"), data_path=data,
                                overrides=[f"train.num_train_epochs={args.epochs}", "train.progress=false",
                                           "train.plots=false"], echo=lambda *_: None)
            results[name].append({"wall_s": time.perf_counter() - tick, **spent})
    compare.shared_data, features.load_feature_data = real_shared, real_load

    rows = []
    for name, runs in results.items():
        rows.append({"variant": name, "reads": runs[0]["calls"],
                     "load_s": statistics.median(x["seconds"] for x in runs),
                     "wall_s": statistics.median(x["wall_s"] for x in runs)})
    n_train = len(real_load(DataConfig(path=data)).train)
    lines = [f"**Default `mmbalance compare` (5 runs, {args.epochs} epochs, {n_train} training rows, "
             f"{args.rounds} rounds, jobs 1)**", "",
             "| variant | dataset reads | time in load_feature_data (median) | share of the compare |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['reads']} | {r['load_s'] * 1000:.0f} ms | "
                     f"{100 * r['load_s'] / r['wall_s']:.1f}% of {r['wall_s']:.1f} s |")
    write_result(args.out, "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
