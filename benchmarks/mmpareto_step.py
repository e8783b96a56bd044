"""MMPareto's step cost, as a ratio to a baseline step, on Transformer encoders; one interleaved run.

Variants, each a full optimizer step (forward, loss, backward, AdamW step, zero_grad) on the same
model and batch: `none` (cross-entropy on the fused logits), MMPareto `gradient_space: parameter`
(exact), MMPareto `gradient_space: feature`, and the exact mode's floor written by hand (the forward, the two
losses' backward through the head, one encoder VJP per loss and the AdamW update of every parameter; an
earlier version of this floor left out the update and the head's gradient, so it undercounted what any
exact variant must do). Model: the synthetic recipe on token inputs
(2 modalities [16, 16], Transformer encoders, hidden 128, 2 layers, 4 heads, features 64, concat
fusion), batch 64. Each round runs every variant `--steps` times, in rotating order; the table reports
the median of per-round ratios to `none`. Single-threaded.

    python benchmarks/mmpareto_step.py --rounds 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from mmbalance_llm.balance import get_method
    from mmbalance_llm.balance.base import TrainContext
    from mmbalance_llm.config import ModelConfig
    from mmbalance_llm.models.registry import build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--encoder", default="transformer")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mmpareto_step"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mods = ["audio", "visual"]
    shape = [16, 16] if args.encoder == "transformer" else [32]
    gen = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(args.batch_size, *shape, generator=gen) for m in mods}
    batch["labels"] = torch.randint(0, 8, (args.batch_size,), generator=gen)
    acc = SimpleNamespace(num_processes=1, unwrap_model=lambda m: m, device=torch.device("cpu"),
                          distributed_type=SimpleNamespace(name="NO"))

    def setup(method, **hp):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder=args.encoder, feature_dim=64, hidden_dim=128, num_layers=2,
                                        num_heads=4), mods, {m: shape for m in mods}, 8)
        model.train()
        bal = get_method(method, **hp)
        bal.setup(TrainContext(accelerator=acc, modalities=mods, num_classes=8, recipe=None, loaders={}), model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, bal, opt

    def balancer_step(model, bal, opt):
        out = bal.forward(model, batch)
        loss, _ = bal.loss(model, batch, out)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def floor_step(model, bal, opt):
        # what any exact variant must do: the forward, the two losses' backward through the head (their
        # cotangents at the features, and the head's own gradient), one encoder VJP per loss, and the update of
        # every parameter (the sum of the two encoder gradients stands in for the Pareto combination)
        out = model(**{m: batch[m] for m in mods})
        y = batch["labels"]
        feats = [out.features[m] for m in mods]
        params = [p for m in mods for _, p in model.modality_parameters(m)]
        enc = {id(p) for p in params}
        head = [p for p in model.parameters() if id(p) not in enc]
        n = len(feats)
        g1 = torch.autograd.grad(F.cross_entropy(out.logits, y), feats + head, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(sum(F.cross_entropy(z, y) for z in out.unimodal_logits.values()), feats + head,
                                 retain_graph=True, allow_unused=True)
        e1 = torch.autograd.grad(feats, params, grad_outputs=g1[:n], retain_graph=True, allow_unused=True)
        e2 = torch.autograd.grad(feats, params, grad_outputs=g2[:n], allow_unused=True)
        for p, a, b in zip(head + params, list(g1[n:]) + list(e1), list(g2[n:]) + list(e2)):
            if a is not None or b is not None:
                p.grad = a if b is None else (b if a is None else a + b)
        opt.step()
        opt.zero_grad()

    variants = {
        "none": (balancer_step, setup("none")),
        "mmpareto exact (parameter)": (balancer_step, setup("mmpareto")),
        "mmpareto feature": (balancer_step, setup("mmpareto", gradient_space="feature")),
        "exact floor (forward + 2 encoder VJPs + update)": (floor_step, setup("none")),
    }
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(args.rounds + 1):
        for n in names[r % len(names):] + names[: r % len(names)]:
            step, state = variants[n]
            tick = time.perf_counter()
            for _ in range(args.steps):
                step(*state)
            if r:  # round 0 warms up
                times[n].append((time.perf_counter() - tick) / args.steps)
    rows = []
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times["none"])]
        rows.append({"variant": n, "ms": 1000 * statistics.median(times[n]), "x": statistics.median(ratios),
                     "min": min(ratios), "max": max(ratios)})
    lines = ["| step | median time | × none (median, min-max) |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ms']:.1f} ms | {r['x']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |" for r in rows]
    md = (f"{args.encoder} encoders, batch {args.batch_size}, {args.rounds} interleaved rounds of {args.steps} "
          f"steps, 1 thread.\n\n" + "\n".join(lines))
    write_result(args.out, md, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
