"""Balance quality and cost of every registered method on the synthetic presets.

For each preset, seed and method (plus every modality trained alone), one `mmbalance train` run in its
own single-threaded process, so that peak memory (the child's max RSS, from os.wait4) belongs to that
run alone. Training time is the time spent in the epochs' training work, the method's own epoch hooks
included (prototypes, re-initialisation, valuation, extra passes) and validation excluded. Ratios compare
each method with the `none` baseline of the same preset and seed, measured in this same invocation;
`--jobs 2` runs two processes side by side (every run then shares the machine alike). Writes benchmarks/results/balance_<preset>.{json,md} and, with
--readme, replaces the table between the README's markers.

    python benchmarks/balance_synthetic.py --presets av_imbalance --seeds 0,1,2 --readme
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import fmt, mean_std  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def run_tracked(recipe: str, overrides: list, env: dict) -> dict:
    """Like run_one, but waits with os.wait4 to read this child's own peak RSS."""
    cmd = [sys.executable, "-m", "mmbalance_llm", "train", recipe, *overrides]
    with tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errf, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read()
    return {"returncode": proc.returncode, "stderr": err[-2000:], "maxrss_mb": usage.ru_maxrss / 1024}


def main(argv=None) -> int:
    from mmbalance_llm.balance import available_methods, method_class
    from mmbalance_llm.config import read_yaml
    from mmbalance_llm.data.synthetic import ensure_preset, preset_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="av_imbalance")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="all", help="comma list, or 'all' registered methods")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "bench"))
    p.add_argument("--readme", action="store_true", help="write the table into README.md between markers")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each single-threaded)")
    p.add_argument("--skip-existing", action="store_true", help="reuse runs whose final_metrics.json exists")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    args = p.parse_args(argv)

    methods = ([m for m in available_methods() if "classify" in method_class(m).tasks]  # sft-only: mllm_*
               if args.methods == "all" else args.methods.split(","))
    methods = ["none"] + [m for m in methods if m != "none"]
    seeds = [int(s) for s in args.seeds.split(",")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", PYTHONPATH=ROOT,
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.makedirs(RESULTS, exist_ok=True)
    for preset in args.presets.split(","):
        data = ensure_preset(os.path.join(args.work_dir, "data", preset), preset=preset)
        modalities = [m.name for m in preset_spec(preset).modalities]
        jobs = []
        for seed in seeds:
            for name in methods + [f"alone-{m}" for m in modalities]:
                out = os.path.join(args.work_dir, preset, f"{name}-seed{seed}")
                method = "none" if name.startswith("alone-") else name
                recipe = os.path.join(ROOT, "recipes", "synthetic", f"{method}.yaml")
                if not os.path.isfile(recipe):
                    recipe = os.path.join(ROOT, "recipes", "synthetic", "baseline.yaml")
                overrides = [f"data.path={data}", f"output_dir={out}", f"train.seed={seed}",
                             f"train.num_train_epochs={args.epochs}", "train.progress=false", "train.plots=false",
                             f"balance.method={method}", *args.extra]
                if name.startswith("alone-"):
                    overrides.append(f"data.modalities=[{name[len('alone-'):]}]")
                jobs.append((name, seed, out, recipe, overrides))

        def execute(job):
            name, seed, out, recipe, overrides = job
            done = os.path.join(out, "final_metrics.json")
            if args.skip_existing and os.path.isfile(done) and os.path.isfile(os.path.join(out, "rss.json")):
                res = {"returncode": 0, **json.load(open(os.path.join(out, "rss.json")))}
            else:
                res = run_tracked(recipe, overrides, env)
                if res["returncode"] == 0:
                    json.dump({"maxrss_mb": res["maxrss_mb"]}, open(os.path.join(out, "rss.json"), "w"))
            if res["returncode"] != 0:
                print(f"[bench] {preset} {name} seed {seed} FAILED: {res['stderr'][-400:]}", flush=True)
                return name, {"seed": seed, "error": res["stderr"][-400:]}
            final = json.load(open(done))
            timing = json.load(open(os.path.join(out, "timing.json")))
            print(f"[bench] {preset} {name} seed {seed}: acc {final['test']['accuracy']:.3f} "
                  f"train {timing['train_seconds']:.1f} s rss {res['maxrss_mb']:.0f} MB", flush=True)
            used = read_yaml(os.path.join(out, "config.yaml"))  # the recipe the run really used
            return name, {"seed": seed, "test": final["test"], "timing": timing, "maxrss_mb": res["maxrss_mb"],
                          "best_epoch": final.get("best_epoch"), "balance": used.get("balance"),
                          "epochs": used.get("train", {}).get("num_train_epochs", used.get("train", {}).get("epochs"))}

        runs = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for name, result in pool.map(execute, jobs):
                runs.setdefault(name, []).append(result)
        write_tables(preset, modalities, methods, seeds, runs, args)
    return 0


def fmt_ratio(pair):
    mean, std = pair
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def write_tables(preset, modalities, methods, seeds, runs, args):
    cost_path = os.path.join(RESULTS, "train_cost.json")
    cost = json.load(open(cost_path)) if os.path.isfile(cost_path) else None
    if cost and cost.get("preset") != preset:
        cost = None
    base = {r["seed"]: r for r in runs.get("none", []) if "error" not in r}
    weak = None
    alone = {m: mean_std([r["test"]["accuracy"] for r in runs.get(f"alone-{m}", []) if "error" not in r])
             for m in modalities}
    if base:
        # the weak modality: the one the joint baseline leaves furthest below its trained-alone accuracy
        gaps = {m: alone[m][0] - statistics.fmean(r["test"]["unimodal_accuracy"][m] for r in base.values())
                for m in modalities if alone[m][0] is not None}
        weak = max(gaps, key=gaps.get) if gaps else None
    from mmbalance_llm.eval.activity import active_at, first_active_epoch

    head = (["method", "fused acc", "macro-F1"] + [f"{m} unimodal acc" for m in modalities]
            + [f"{m} probe acc" for m in modalities]
            + ["imbalance", "probe imbalance", "best epoch", "active at best", "train time ×", "peak RSS ×"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    for name in methods:
        ok = [r for r in runs.get(name, []) if "error" not in r]
        if not ok:
            lines.append(f"| {name} | failed | " + " | ".join("-" for _ in head[2:]) + " |")
            continue
        row = {k: mean_std([r["test"].get(k) for r in ok]) for k in ("accuracy", "macro_f1", "imbalance")}
        row["unimodal"] = {m: mean_std([r["test"]["unimodal_accuracy"][m] for r in ok]) for m in modalities}
        row["probe"] = {m: mean_std([(r["test"].get("unimodal_probe_accuracy") or {}).get(m) for r in ok])
                        for m in modalities}
        row["imbalance_probe"] = mean_std([r["test"].get("imbalance_probe") for r in ok])
        row["best_epoch"] = [r.get("best_epoch") for r in ok]
        row["first_active_epoch"] = first_active_epoch(name, ok[0].get("balance"), ok[0].get("epochs"))
        row["active_at_best"] = [active_at(name, r.get("balance"), r.get("best_epoch"), r.get("epochs")) for r in ok]
        row["time_ratio"] = mean_std([r["timing"]["train_seconds"] / base[r["seed"]]["timing"]["train_seconds"]
                                      for r in ok if r["seed"] in base])
        if cost and name in cost["ratio"]:  # interleaved measurement: robust to load on a shared machine
            row["time_ratio"] = (cost["ratio"][name], None)
        row["rss_ratio"] = mean_std([r["maxrss_mb"] / base[r["seed"]]["maxrss_mb"] for r in ok if r["seed"] in base])
        summary[name] = row
        cells = [name, fmt(row["accuracy"]), fmt(row["macro_f1"])]
        cells += [("**" + fmt(row["unimodal"][m]) + "**") if m == weak else fmt(row["unimodal"][m]) for m in modalities]
        cells += [fmt(row["probe"][m]) for m in modalities]
        flags = [f for f in row["active_at_best"] if f is not None]
        first = row["first_active_epoch"]
        active = "-" if not flags else f"{sum(flags)}/{len(flags)}" + (f" (from {first})" if first and first > 1 else "") \
            + (" (never)" if first is None else "")
        cells += [fmt(row["imbalance"], 1, 3), fmt(row["imbalance_probe"], 1, 3),
                  ", ".join(str(e) for e in row["best_epoch"]), active,
                  fmt_ratio(row["time_ratio"]), fmt(row["rss_ratio"], 1, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["each modality trained alone", "-", "-"] + [fmt(alone[m]) for m in modalities]
    lines.append("| " + " | ".join(cells + ["-"] * (len(head) - len(cells))) + " |")
    table = "\n".join(lines) + "\n"
    timing = ("Train time × comes from `benchmarks/train_cost.py` (all methods trained in interleaved epochs in "
              "one process, robust to load on a shared machine)" if cost else
              "Train time × compares runs with the same seed in this invocation")
    note = (f"Preset `{preset}`, {len(seeds)} seeds ({', '.join(map(str, seeds))}), {args.epochs} epochs, test split "
            f"of the checkpoint chosen on validation; mean ± std. Weak modality in bold: `{weak}`. Unimodal acc is "
            f"the fused model's own unimodal path; probe acc a fresh linear probe on that modality's frozen encoder "
            f"features; best epoch per seed, and on how many seeds the method had acted by then. {timing}; peak "
            f"RSS × is each run's own process against `none` with the same seed.\n")
    with open(os.path.join(RESULTS, f"balance_{preset}.md"), "w", encoding="utf-8") as fh:
        fh.write(note + "\n" + table)
    with open(os.path.join(RESULTS, f"balance_{preset}.json"), "w", encoding="utf-8") as fh:
        json.dump({"preset": preset, "seeds": seeds, "epochs": args.epochs, "weak_modality": weak,
                   "alone": alone, "rows": summary, "runs": runs}, fh, indent=1)
    print(note + table, flush=True)
    if args.readme:
        readme = os.path.join(ROOT, "README.md")
        text = open(readme, encoding="utf-8").read()
        start, end = f"<!-- bench:balance_{preset} -->", f"<!-- /bench:balance_{preset} -->"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: f"{start}\n{note}\n{table}{end}", text)
            open(readme, "w", encoding="utf-8").write(text)


if __name__ == "__main__":
    raise SystemExit(main())
