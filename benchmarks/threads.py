"""Training-step time of the quick-start models with torch's default threading, 1 thread and 2 threads,
on an idle and on a loaded machine; one interleaved run per condition.

Models: the synthetic recipe (MLP encoders on av_imbalance's [32] inputs; Transformer encoders on the
`tokens` preset's [16, 16] inputs), batch 64, AdamW, a hand-written loop (forward, backward, step). Each
round times `--steps` steps under every thread setting in rotating order (`torch.set_num_threads`);
"default" is torch's own choice at start-up (`torch.get_num_threads()` before any change, normally the
number of physical cores). "Loaded" starts one busy-looping process per CPU core for the duration, the
situation of two `compare` jobs at once or of a shared CI box. The table gives median step times and
ratios to 1 thread, with the 1-minute load average before each condition (other users of the machine
show there too).

    python benchmarks/threads.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def busy_processes(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from mmbalance_llm.config import ModelConfig
    from mmbalance_llm.models.registry import build_model

    default_threads = torch.get_num_threads()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "threads"))
    args = p.parse_args(argv)
    settings = {"default": default_threads, "1 thread": 1, "2 threads": 2}
    models = {}
    for name, encoder, shape in (("MLP [32]", "mlp", [32]), ("Transformer [16, 16]", "transformer", [16, 16])):
        torch.manual_seed(0)
        mods = ["audio", "visual"]
        model = build_model(ModelConfig(encoder=encoder, feature_dim=64, hidden_dim=128, num_layers=2), mods,
                            {m: shape for m in mods}, 8)
        gen = torch.Generator().manual_seed(0)
        batch = {m: torch.randn(64, *shape, generator=gen) for m in mods}
        labels = torch.randint(0, 8, (64,), generator=gen)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        models[name] = (model, batch, labels, opt)

    def run_steps(model, batch, labels, opt):
        for _ in range(args.steps):
            loss = F.cross_entropy(model(**batch).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()

    results = []
    for condition in ("idle", "loaded"):
        load_before = os.getloadavg()[0]
        busy = busy_processes(os.cpu_count() or 1) if condition == "loaded" else []
        try:
            time.sleep(1.0 if busy else 0.0)
            for name, state in models.items():
                names = list(settings)
                times = {s: [] for s in names}
                for r in range(args.rounds + 1):
                    for s in names[r % len(names):] + names[: r % len(names)]:
                        torch.set_num_threads(settings[s])
                        tick = time.perf_counter()
                        run_steps(*state)
                        if r:  # round 0 warms up
                            times[s].append((time.perf_counter() - tick) / args.steps)
                row = {"condition": condition, "load_1min_before": load_before, "model": name}
                for s in names:
                    row[s + " ms"] = 1000 * statistics.median(times[s])
                    row[s + " x"] = statistics.median(t / b for t, b in zip(times[s], times["1 thread"]))
                results.append(row)
                print(row, flush=True)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    torch.set_num_threads(default_threads)
    lines = [f"{os.cpu_count()} CPUs; torch default = {default_threads} threads; {args.rounds} interleaved rounds of "
             f"{args.steps} steps; ratios are medians of per-round ratios to 1 thread.", "",
             "| machine | load avg before | model | default | 1 thread | 2 threads |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r[s + ' ms']:.1f} ms ({r[s + ' x']:.2f}x)" for s in settings]
        lines.append(f"| {r['condition']} | {r['load_1min_before']:.1f} | {r['model']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as fh:
        fh.write(md + "\n")
    with open(args.out + ".json", "w") as fh:
        json.dump({"default_threads": default_threads, "cpus": os.cpu_count(), "rows": results}, fh, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
