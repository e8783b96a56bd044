"""Whole-process start-up time of the CLI, as a ratio to `python -c "import torch"`; one interleaved run.

Each round runs every command once as a fresh process (`python -m mmbalance_llm ...`, so the checkout's
code is timed), in rotating order; the table reports median wall times and the median of per-round
ratios to `import torch`. The OS file cache is warm after round 0, which is not timed.

    python benchmarks/startup.py --rounds 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMANDS = {
    'python -c "import torch"': ["-c", "import torch"],
    "mmbalance --help": ["-m", "mmbalance_llm", "--help"],
    "mmbalance --version": ["-m", "mmbalance_llm", "--version"],
    "mmbalance make-data --help": ["-m", "mmbalance_llm", "make-data", "--help"],
    "mmbalance methods": ["-m", "mmbalance_llm", "methods"],
    'python -c "import transformers, torch; transformers.PreTrainedModel"': [
        "-c", "import transformers, torch; transformers.PreTrainedModel"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "startup"))
    args = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    names = list(COMMANDS)
    times = {n: [] for n in names}
    for r in range(args.rounds + 1):
        for n in names[r % len(names):] + names[: r % len(names)]:
            tick = time.perf_counter()
            subprocess.run([sys.executable, *COMMANDS[n]], env=env, stdout=subprocess.DEVNULL, check=True)
            if r:
                times[n].append(time.perf_counter() - tick)
    base = names[0]
    lines = ["| command | median wall time | × `import torch` (median, min-max) |", "|---|---|---|"]
    rows = []
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[base])]
        rows.append({"command": n, "s": statistics.median(times[n]), "x": statistics.median(ratios),
                     "min": min(ratios), "max": max(ratios)})
        lines.append(f"| `{n}` | {rows[-1]['s']:.2f} s | {rows[-1]['x']:.2f} ({rows[-1]['min']:.2f}-{rows[-1]['max']:.2f}) |")
    md = f"{args.rounds} interleaved rounds, whole processes.\n\n" + "\n".join(lines)
    write_result(args.out, md, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
