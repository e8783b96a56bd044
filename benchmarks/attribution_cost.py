"""Cost of each attribution method as a multiple of one forward pass on the same batch.

    PYTHONPATH=. python benchmarks/attribution_cost.py [--repeats 7] [--out benchmarks/results/attribution_cost.md]

Models: a `MultimodalClassifier` with Transformer encoders on two [16, 16] token modalities (B = 32), and the
tiny LLaVA and Qwen2-Audio twins on generated items (B = 4). The reference is one `model(**batch)` under
`no_grad` (for the MLLMs the full forward, towers included). Each method is timed from scratch, i.e.
`attribute(model, batch, method)` including its preparation (the MLLM adapter's capture forward), median
of `--repeats` runs after one warm-up, interleaved with the reference so machine load hits both alike.
Targets: gradient x input <= 3x, integrated gradients <= steps + 1.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

STEPS = 16
OPTIONS = {"steps": STEPS, "n_groups": 4, "n_permutations": 8}
METHODS = ("attention", "grad_x_input", "integrated_gradients", "shapley_modality", "shapley_tokens", "ablation")


def _classifier(shape, B):
    from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

    torch.manual_seed(0)
    cfg = MultimodalClassifierConfig(modalities=["audio", "visual"], input_shapes={"audio": shape, "visual": shape},
                                     num_classes=8, feature_dim=32, hidden_dim=64, num_layers=2, num_heads=4)
    model = MultimodalClassifier(cfg).eval()
    batch = {"audio": torch.randn(B, *shape), "visual": torch.randn(B, *shape)}
    return model, batch, torch.randint(0, 8, (B,)), lambda: model(**batch)


def _mllm(family, media, tmp):
    from mmbalance_llm.data.chat import ChatCollator, normalize_record
    from mmbalance_llm.data.mm_synthetic import generate_items, to_sharegpt
    from mmbalance_llm.models.tiny import tiny_model_and_processor

    model, proc = tiny_model_and_processor(family)
    items = generate_items(4, tmp, (media,), seed=0, text_fraction=0.0)
    recs = [normalize_record(to_sharegpt(it), str(Path(tmp) / "x.json"), i) for i, it in enumerate(items)]
    batch = ChatCollator(proc, model.config)(recs)
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    return model, batch, None, lambda: model(**fwd)


def _time(fn) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t


def measure(name, model, batch, target, forward, repeats):
    from mmbalance_llm.attribution import attribute
    from mmbalance_llm.attribution.methods import frozen

    def fwd_bwd():  # reference: forward + backward to the inputs with frozen weights (what a gradient costs)
        with frozen(model), torch.enable_grad():
            ad = make_adapter(model, batch, target)
            leaves = {k: v.requires_grad_(True) for k, v in ad.leaves().items()}
            torch.autograd.grad(ad.score(leaves)[0].sum(), list(leaves.values()))

    from mmbalance_llm.attribution import make_adapter

    rows = []
    fwd_bwd()
    ratios = []
    for _ in range(repeats):
        f = statistics.median(_time(forward) for _ in range(3))
        t = time.perf_counter()
        fwd_bwd()
        ratios.append((time.perf_counter() - t) / f)
    rows.append((name, "(reference) one input gradient", statistics.median(ratios), ""))
    print(f"{name:<14} {'one input gradient':<22} {rows[-1][2]:7.2f}x", flush=True)
    for method in METHODS:
        run = lambda: attribute(model, batch, method, target=target, **OPTIONS)  # noqa: E731
        try:
            run()  # warm-up
        except ValueError as e:
            rows.append((name, method, None, str(e).split(";")[0]))
            continue
        forward()
        ratios = []
        for _ in range(repeats):
            f = statistics.median(_time(forward) for _ in range(3))
            t = time.perf_counter()
            run()
            ratios.append((time.perf_counter() - t) / f)
        rows.append((name, method, statistics.median(ratios), ""))
        print(f"{name:<14} {method:<22} {rows[-1][2]:7.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is stable on a shared CPU)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "attribution_cost.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += measure("classifier Transformer", *_classifier([16, 16], 32), a.repeats)
        rows += measure("tiny LLaVA", *_mllm("llava", "image", tmp + "/l"), a.repeats)
        rows += measure("tiny Qwen2-Audio", *_mllm("qwen2_audio", "audio", tmp + "/q"), a.repeats)
    names = list(dict.fromkeys(r[0] for r in rows))
    table = {(r[0], r[1]): r for r in rows}
    lines = ["# Attribution cost (multiples of one forward pass on the same batch)", "",
             f"Median of {a.repeats} runs, torch threads = {a.threads}, CPU. Method options: integrated gradients "
             f"{STEPS} steps; MM-SHAP 4 groups per modality, 8 permutations; each run includes the method's own "
             "preparation (MLLM: one capture forward). Classifier (target class given): Transformer encoders on "
             "two [16, 16] token modalities, B = 32 (with MLP encoders one forward takes ~0.1 ms and the ratio would "
             "measure Python overhead). MLLMs: B = 4, "
             "target = the answer tokens. The first row is the reference cost of one input gradient (forward + "
             "backward with frozen weights).", "",
             "| method | target | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    targets = {"grad_x_input": "≤ 3x", "integrated_gradients": f"≤ {STEPS + 1}x (steps + 1)"}
    for m in ("(reference) one input gradient",) + METHODS:
        cells = []
        for n in names:
            r = table[(n, m)]
            cells.append(f"{r[2]:.2f}x" if r[2] is not None else "n/a (no joint attention)")
        lines.append(f"| {m} | {targets.get(m, '')} | " + " | ".join(cells) + " |")
    grad = {n: table[(n, "(reference) one input gradient")][2] for n in names}
    lines += ["", "In units of one input gradient (the cost IG repeats per step): integrated gradients = "
              + ", ".join(f"{n} {table[(n, 'integrated_gradients')][2] / grad[n]:.1f}" for n in names)
              + f" (steps + 2 = {STEPS + 2} path rows per sample, batched)."]
    lines += ["", "shapley_modality costs 2^M passes (M = modalities incl. text for MLLMs); shapley_tokens costs "
                  "B x permutations x (players + 1) decoder passes, batched; attention is one eager forward."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
