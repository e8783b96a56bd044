"""Fork-Merge Decoding vs plain decoding on the tiny Qwen2.5-Omni thinker twin (image + audio), CPU.

Per seed: build the twin (random weights), fine-tune it briefly (full model, ``mmbalance_llm.train.trainer.train``,
adapter ``none``) on the generated image+audio instruction set (every item carries a shape *and* a tone; one of
them answers), then score the generated diagnostic benchmark (audio-needed, image-needed, text and two-modality
items, both media always present) with plain decoding and FMD (attention-guided and average merge; ``fmd-zero``
hides the other modality by zeroing its embeddings instead of masking its keys) on the same items. Reports
accuracy per item type, reliance deltas (acc_full - acc_without_m) and the cost of one generated token
(prefill + decode, greedy) as a ratio to plain decoding.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fmd.py --seeds 0 1 2 --out runs/bench_fmd

Writes ``fmd.json`` and ``fmd.md`` (the table that docs/fork_merge.md quotes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import fmt, mean_std  # noqa: E402

FAMILY = "qwen2_5_omni_thinker"
DECODINGS = {"plain": ("plain", {}), "fmd-attention": ("fmd", {"fork_layers": 1, "merge": "attention"}),
             "fmd-average": ("fmd", {"fork_layers": 1, "merge": "average"}),
             "fmd-zero": ("fmd", {"fork_layers": 1, "merge": "attention", "mask": "zero"})}


def set_fork_layers(forks: list) -> None:
    """One column per (variant, L_fork) when several fork depths are asked for (deeper twins)."""
    if forks == [1]:
        return
    base = {k: v for k, v in DECODINGS.items() if k != "plain"}
    DECODINGS.clear()
    DECODINGS["plain"] = ("plain", {})
    for L in forks:
        for name, (dec, kw) in base.items():
            DECODINGS[f"{name}-L{L}"] = (dec, {**kw, "fork_layers": L})
GROUPS = ("audio", "image", "text", "audio+text", "image+text", "image+audio")


def finetune(root: Path, seed: int, data_dir: Path, epochs: int, n_train: int, layers: int = 2) -> tuple:

    from mmbalance_llm.eval.reliance import load_mllm
    from mmbalance_llm.models.tiny import build_tiny

    tiny = build_tiny(FAMILY, root / f"tiny-{seed}", seed=seed, text_layers=layers)
    if epochs == 0:
        return load_mllm(str(tiny)), {}
    raw = {
        "task": "sft", "output_dir": str(root / f"sft-{seed}"), "adapter": "none",
        "model": {"name_or_path": str(tiny),
                  "freeze": {"tower": False, "projector": False, "language_model": False}},
        "data": {"train": str(data_dir / "train.json"), "validation": str(data_dir / "validation.json"),
                 "max_length": 128,
                 "generate": {"modalities": ["image", "audio"], "n_train": n_train, "n_validation": 60,
                              "n_test": 0, "seed": 0}},
        "train": {"num_train_epochs": epochs, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
                  "learning_rate": 3.0e-3, "warmup_ratio": 0.05, "seed": seed, "logging_steps": 1000,
                  "progress": False},
        "eval": {"accuracy": "options"}}
    from mmbalance_llm.train.trainer import train

    final = train(raw) or {}
    from mmbalance_llm.data.chat import load_processor
    from mmbalance_llm.models.modality_map import model_class_for
    from transformers import AutoConfig

    best = root / f"sft-{seed}" / "best"  # full weights (adapter none); the processor is read from the twin
    model = model_class_for(AutoConfig.from_pretrained(best)).from_pretrained(best)
    return (model.eval(), load_processor(str(tiny))), final


def score(model, proc, items) -> dict:
    from mmbalance_llm.eval.reliance import MLLMScorer, evaluate_reliance

    sc = MLLMScorer(model, proc, batch_size=32)
    out = {}
    for name, (dec, kw) in DECODINGS.items():
        sc.decoding, sc.fmd = dec, kw
        t = time.perf_counter()
        ev = evaluate_reliance(sc, items, "avqa", blank=False, drop=True)
        full = [s["conditions"]["full"] for s in ev["samples"]]
        out[name] = {"results": ev["results"], "seconds": time.perf_counter() - t,
                     "preds": [c["pred"] for c in full],
                     "logp_correct": [c["logprobs"][it.options.index(it.answer)] for c, it in zip(full, items)]}
    return out


def generation_cost(model, proc, items, n_new: int = 16, repeats: int = 3) -> dict:
    """Seconds per generated token (greedy, KV cache, batch of 8 prompts), min over repeats; and prefill alone."""
    import torch

    from mmbalance_llm.data.chat import ChatCollator
    from mmbalance_llm.decoding import decoding_context
    from mmbalance_llm.eval.reliance import MLLMScorer

    col = ChatCollator(proc, model.config)
    sc = MLLMScorer(model, proc)
    encs = [col.encode(sc.record(it, ("image", "audio")), add_answer=False) for it in items[:8]]
    batch = col.pad(encs, padding_side="left")
    batch.pop("labels")
    tok = col.tok
    out = {}
    for name, (dec, kw) in DECODINGS.items():
        gen, pre = [], []
        with torch.no_grad(), decoding_context(model, dec, **kw):
            for _ in range(repeats):
                t = time.perf_counter()
                g = model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
                gen.append((time.perf_counter() - t) / (g.shape[1] - batch["input_ids"].shape[1]))
                t = time.perf_counter()
                model(**batch)
                pre.append(time.perf_counter() - t)
        out[name] = {"s_per_token": min(gen), "prefill_s": min(pre)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench_fmd")
    p.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs (0: random twins)")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-items", type=int, default=120, help="diagnostic benchmark items")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the twin")
    p.add_argument("--fork-layers", type=int, nargs="+", default=[1], help="FMD fork depths to compare")
    a = p.parse_args(argv)
    set_fork_layers(a.fork_layers)
    import torch

    torch.set_num_threads(1)
    from mmbalance_llm.data.diagnostic import write_diagnostic
    from mmbalance_llm.eval.benchmark_formats import load_benchmark

    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    bench = write_diagnostic(root / "diagnostic", n=a.n_items, seed=123)
    _, items = load_benchmark(bench["avqa"], "auto", None)
    runs, t0 = [], time.perf_counter()
    for seed in a.seeds:
        t = time.perf_counter()
        (model, proc), final = finetune(root, seed, root / "mm_instruct_av", a.epochs, a.n_train, a.layers)
        t_ft = time.perf_counter() - t
        res = score(model, proc, items)
        cost = generation_cost(model, proc, items)
        runs.append({"seed": seed, "finetune_s": t_ft, "finetune": final, "scores": res, "cost": cost})
        print(f"seed {seed}: fine-tune {t_ft:.0f}s, val acc {final.get('validation_accuracy_best')}, "
              + ", ".join(f"{k} acc {v['results']['acc,full']:.3f}" for k, v in res.items()), flush=True)
    total = time.perf_counter() - t0
    (root / "fmd.json").write_text(json.dumps({"runs": runs, "n_items": len(items), "total_s": total}, indent=1,
                                              default=str))
    md = table(runs, len(items), total, a.layers, a.fork_layers)
    (root / "fmd.md").write_text(md)
    print(md)
    return 0


def table(runs, n_items, total, layers: int = 2, forks=(1,)) -> str:
    def cell(name, key):
        return fmt(mean_std([r["scores"][name]["results"].get(key) for r in runs]))

    lines = [f"{len(runs)} seeds × {n_items} diagnostic items; accuracy in % (mean ± std over seeds); "
             f"fork_layers = {', '.join(map(str, forks))} of {layers}; "
             f"total {total:.0f} s", "",
             "| item type (needs) | " + " | ".join(DECODINGS) + " |", "|---|" + "---|" * len(DECODINGS)]
    for g in GROUPS:
        lines.append(f"| {g} | " + " | ".join(cell(n, f"acc_needs/{g},full") for n in DECODINGS) + " |")
    lines.append("| all | " + " | ".join(cell(n, "acc,full") for n in DECODINGS) + " |")
    lines += ["", "| reliance Δ (acc_full − acc_without) | " + " | ".join(DECODINGS) + " |",
              "|---|" + "---|" * len(DECODINGS)]
    for cond in ("drop_audio", "drop_image", "no_media"):
        lines.append(f"| {cond} | " + " | ".join(cell(n, f"reliance_delta,{cond}") for n in DECODINGS) + " |")
    for g, cond in (("audio", "drop_audio"), ("image", "drop_image")):
        lines.append(f"| {g}-needed items, {cond} | " + " | ".join(
            fmt(mean_std([r["scores"][n]["results"][f"acc_needs/{g},full"]
                          - r["scores"][n]["results"][f"acc_needs/{g},{cond}"] for r in runs])) for n in DECODINGS) + " |")
    lines += ["", "| change against plain (full condition) | " + " | ".join(DECODINGS) + " |",
              "|---|" + "---|" * len(DECODINGS)]
    lines.append("| predictions that differ from plain, % | " + " | ".join(fmt(mean_std([
        sum(a != b for a, b in zip(r["scores"][n]["preds"], r["scores"]["plain"]["preds"])) / n_items
        for r in runs])) for n in DECODINGS) + " |")
    lines.append("| mean abs. change of log p(correct option) | " + " | ".join(fmt(mean_std([
        sum(abs(a - b) for a, b in zip(r["scores"][n]["logp_correct"], r["scores"]["plain"]["logp_correct"])) / n_items
        for r in runs]), 1.0, 3) for n in DECODINGS) + " |")
    lines += ["", "| cost (batch 8, greedy, KV cache, 16 new tokens) | " + " | ".join(DECODINGS) + " |",
              "|---|" + "---|" * len(DECODINGS)]
    plain_tok = [r["cost"]["plain"]["s_per_token"] for r in runs]
    plain_pre = [r["cost"]["plain"]["prefill_s"] for r in runs]
    lines.append("| time per generated token / plain | " + " | ".join(
        fmt(mean_std([r["cost"][n]["s_per_token"] / b for r, b in zip(runs, plain_tok)]), 1.0, 2) for n in DECODINGS) + " |")
    lines.append("| prefill time / plain | " + " | ".join(
        fmt(mean_std([r["cost"][n]["prefill_s"] / b for r, b in zip(runs, plain_pre)]), 1.0, 2) for n in DECODINGS) + " |")
    lines.append("| scoring time of the benchmark / plain | " + " | ".join(
        fmt(mean_std([r["scores"][n]["seconds"] / r["scores"]["plain"]["seconds"] for r in runs]), 1.0, 2)
        for n in DECODINGS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
