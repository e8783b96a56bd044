"""RollingQ against the plain attention-fusion baseline on the `tokens_starve` preset, 5 seeds.

Each run is `mmbalance train recipes/fusion_transformer/<recipe>.yaml` in its own single-threaded
process (seed s: data seed s and training seed s). Reports test fused accuracy, each modality's probe
accuracy, the query's attention-share gap and AIR on test, and the training-time ratio to the baseline
of the same seed; plots the validation attention-share curves (mean ± std over seeds). Writes
benchmarks/results/rollingq.{md,json} and benchmarks/results/rollingq_attention_share.png.

    python benchmarks/rollingq_tokens.py --seeds 0,1,2,3,4 --jobs 2
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import fmt, mean_std  # noqa: E402
RESULTS = os.path.join(ROOT, "benchmarks", "results")

VARIANTS = {  # name -> (recipe, extra overrides)
    "fusion_transformer (none)": ("baseline", []),
    "fusion_transformer + RollingQ (r_time 16)": ("rollingq", []),  # the recipe: a rotation after every epoch
    "fusion_transformer + RollingQ (r_time 1)": ("rollingq", ["balance.r_time=1"]),  # the official default
}
ALONE = {f"{m} alone": ("baseline", [f"data.modalities=[{m}]"]) for m in ("audio", "visual")}  # the reference


def main(argv=None) -> int:
    from mmbalance_llm.data.synthetic import ensure_preset
    from mmbalance_llm.eval.attention_plots import attention_curves, mean_curves, plot_attention_shares

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--preset", default="tokens_starve")
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "bench_rollingq"))
    p.add_argument("--skip-existing", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. the paper's schedule: "
                   "train.optimizer=sgd train.scheduler=cosine train.lr=0.05 train.weight_decay=1e-4")
    p.add_argument("--tag", default="", help="suffix of the result files (rollingq<_tag>.md/json/png)")
    p.add_argument("--no-alone", action="store_true", help="skip the trained-alone reference runs")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", PYTHONPATH=ROOT,
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    jobs = []
    for seed in seeds:
        data = ensure_preset(os.path.join(args.work_dir, "data", f"seed{seed}"), preset=args.preset, seed=seed,
                             train_size=args.train_size, validation_size=400, test_size=400)
        for i, (name, (recipe, extra)) in enumerate({**VARIANTS, **({} if args.no_alone else ALONE)}.items()):
            out = os.path.join(args.work_dir, f"v{i}-seed{seed}")
            overrides = [f"data.path={data}", f"output_dir={out}", f"train.seed={seed}", f"train.num_train_epochs={args.epochs}",
                         "train.progress=false", "train.plots=false", "train.shapley=false", *args.extra, *extra]
            jobs.append((name, seed, out, os.path.join(ROOT, "recipes", "fusion_transformer", f"{recipe}.yaml"),
                         overrides))

    def execute(job):
        name, seed, out, recipe, overrides = job
        done = os.path.join(out, "final_metrics.json")
        if not (args.skip_existing and os.path.isfile(done)):
            proc = subprocess.run([sys.executable, "-m", "mmbalance_llm", "train", recipe, *overrides], cwd=ROOT,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"[bench] {name} seed {seed} FAILED: {proc.stderr[-600:]}", flush=True)
                return name, None
        final = json.load(open(done))
        timing = json.load(open(os.path.join(out, "timing.json")))
        print(f"[bench] {name} seed {seed}: acc {final['test']['accuracy']:.3f} "
              f"probes {final['test']['unimodal_accuracy']}", flush=True)
        return name, {"seed": seed, "test": final["test"], "timing": timing,
                      "curves": attention_curves(os.path.join(out, "metrics.jsonl"))}

    runs = {name: [] for name in {**VARIANTS, **({} if args.no_alone else ALONE)}}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, res in pool.map(execute, jobs):
            if res is not None:
                runs[name].append(res)
    os.makedirs(RESULTS, exist_ok=True)
    write_report(runs, seeds, args)
    curves = {name.replace("fusion_transformer", "FT"): mean_curves([r["curves"] for r in rs])
              for name, rs in runs.items() if rs and name in VARIANTS}
    suffix = f"_{args.tag}" if args.tag else ""
    plot_attention_shares(curves, os.path.join(RESULTS, f"rollingq{suffix}_attention_share.png"),
                          title=f"{args.preset}: fusion-query attention share (validation, mean ± std, {len(seeds)} seeds)")
    return 0


def train_seconds(timing: dict) -> float:
    return timing.get("train_seconds", timing.get("step_seconds", timing["wall_seconds"]))


def write_report(runs: dict, seeds, args) -> None:
    mods = ["audio", "visual"]
    base = {r["seed"]: r for r in runs[next(iter(VARIANTS))]}
    head = ["model", "fused acc", "audio probe acc", "visual probe acc (weak)", "audio encoder probe",
            "visual encoder probe", "attention-share gap", "AIR", "train time ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    for name, rs in runs.items():
        if not rs:
            lines.append(f"| {name} | failed |" + " - |" * (len(head) - 2))
            continue
        row = {"accuracy": mean_std([r["test"]["accuracy"] for r in rs]),
               **{m: mean_std([r["test"]["unimodal_accuracy"].get(m) for r in rs]) for m in mods},
               **{f"{m}_encoder": mean_std([(r["test"].get("unimodal_probe_accuracy") or {}).get(m) for r in rs])
                  for m in mods},
               "share_gap": mean_std([r["test"]["attention"]["share_gap"] for r in rs if name in VARIANTS]),
               "air": mean_std([r["test"]["attention"]["air"] for r in rs if name in VARIANTS]),
               "time": mean_std([train_seconds(r["timing"]) / train_seconds(base[r["seed"]]["timing"])
                                 for r in rs if r["seed"] in base and name in VARIANTS])}
        summary[name] = {k: {"mean": v[0], "std": v[1]} for k, v in row.items()}
        summary[name]["per_seed"] = [{"seed": r["seed"], "test": r["test"]} for r in rs]
        lines.append(f"| {name} | {fmt(row['accuracy'])} | {fmt(row['audio'])} | {fmt(row['visual'])} | "
                     f"{fmt(row['audio_encoder'])} | {fmt(row['visual_encoder'])} | {fmt(row['share_gap'])} | {fmt(row['air'], 1, 3)} | {fmt(row['time'], 1, 2)} |")
    note = (f"Test split, mean ± std over seeds {','.join(map(str, seeds))} (data and training seed), "
            f"{args.epochs} epochs, {args.train_size} training samples, `{args.preset}` preset. Probe accuracy: "
            "linear probes on the detached modality features (they do not sum to the fused logits). Encoder probe: "
            "a fresh linear probe fitted after training on the frozen features (unimodal_probe_accuracy). "
            "Attention-share gap: |share_audio - share_visual| of the fusion query, per-token normalised. "
            "Train time ×: time in training epochs (RollingQ's estimation pass included) over the baseline's. "
            "'<m> alone': the same model trained on modality m only (the reference for what m can reach).")
    suffix = f"_{args.tag}" if args.tag else ""
    extra = f" Extra overrides: `{' '.join(args.extra)}`." if args.extra else ""
    md = "\n".join([f"# RollingQ on {args.preset}", "", note + extra, "", *lines, "",
                    f"![attention share](rollingq{suffix}_attention_share.png)", ""])
    with open(os.path.join(RESULTS, f"rollingq{suffix}.md"), "w", encoding="utf-8") as fh:
        fh.write(md)
    with open(os.path.join(RESULTS, f"rollingq{suffix}.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
