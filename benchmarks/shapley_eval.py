"""Cost of the validation pass with the modality Shapley metric, as a ratio to one plain forward pass.

For M = 2, 3, 4 modalities (MLP encoders of the synthetic recipe: [32] inputs, hidden 128, features 64,
concat fusion; 1000 validation rows, eval batch 256; and Transformer encoders on [16, 16] token inputs at
M = 2), times `collect` without subsets (one plain pass), with all 2^M - 1 subset predictions the way
they were computed before (one full forward pass per subset) and with encode-once (the features of
the plain pass reused, zero-input features once per batch shape, one fusion per subset). Each round
runs every variant once in rotating order; the table reports the median of per-round ratios to the
plain pass. Single-threaded.

    python benchmarks/shapley_eval.py --rounds 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    import torch
    from accelerate import Accelerator

    from mmbalance_llm.config import ModelConfig
    from mmbalance_llm.data.features import FeatureDataset, collate
    from mmbalance_llm.eval import subset_pass
    from mmbalance_llm.eval.evaluator import collect
    from mmbalance_llm.eval.metrics import subsets
    from mmbalance_llm.models.registry import build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "shapley_eval"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    cases = [("mlp", 2), ("mlp", 3), ("mlp", 4), ("transformer", 2)]
    results = []
    for encoder, m in cases:
        mods = ["audio", "visual", "text", "depth"][:m]
        shape = [16, 16] if encoder == "transformer" else [32]
        gen = torch.Generator().manual_seed(0)
        ds = FeatureDataset({k: torch.randn(args.rows, *shape, generator=gen) for k in mods},
                            torch.randint(0, 8, (args.rows,), generator=gen))
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate)
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder=encoder, feature_dim=64, hidden_dim=128, num_layers=2),
                            mods, {k: shape for k in mods}, 8)
        keep = [s for s in subsets(mods) if len(s) < m]
        supported = subset_pass.encode_once_supported

        def plain_pass():
            collect(model, loader, acc, mods)

        def encode_once():
            collect(model, loader, acc, mods, keep)

        def per_subset():
            subset_pass.encode_once_supported = lambda core, accelerator: False
            try:
                collect(model, loader, acc, mods, keep)
            finally:
                subset_pass.encode_once_supported = supported

        variants = {"plain": plain_pass, "before": per_subset, "encode_once": encode_once}
        times = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds + 1):
            for k in names[r % 3:] + names[: r % 3]:
                tick = time.perf_counter()
                variants[k]()
                if r:  # round 0 warms up
                    times[k].append(time.perf_counter() - tick)
        ratio = {k: statistics.median(t / b for t, b in zip(times[k], times["plain"])) for k in ("before", "encode_once")}
        results.append({"encoder": encoder, "modalities": m, "plain_ms": 1000 * statistics.median(times["plain"]),
                        "before_x": ratio["before"], "encode_once_x": ratio["encode_once"]})
        print(results[-1], flush=True)
    lines = [f"| encoders | M | plain pass | Shapley, one pass per subset (before) | Shapley, encode once |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['encoder']} | {r['modalities']} | {r['plain_ms']:.1f} ms | {r['before_x']:.2f}x | "
                     f"{r['encode_once_x']:.2f}x |")
    md = (f"Validation pass over {args.rows} rows, batch {args.batch_size}, {args.rounds} interleaved rounds, "
          f"1 thread; ratios are medians of per-round ratios to the plain pass.\n\n" + "\n".join(lines))
    write_result(args.out, md, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
