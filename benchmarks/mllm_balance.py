"""MLLM balancing on text-dominant data: tiny LLaVA (image) and tiny Qwen2-Audio (audio) twins, plain LoRA, plain
MokA, IMoD and every MLLM balancing method, 5 seeds.

The data is the generated instruction set with a text prior (`data.generate.text_prior`, default 0.8): in training
and validation, 80% of the media questions take their kind's prior answer, so the question text alone scores most
of them; the test split has uniform answers (`test_prior: absent`), so there the medium is needed. Columns (test
split, read once, at the checkpoint validation chose; mean ± std over seeds, each seed its own data and weights):

* **paired Δ**: per seed, the run's needs-medium accuracy minus its plain run's on the same data and twin
  weights (MokA for the MokA rows, LoRA for the LoRA rows and IMoD), mean ± std, and on how many seeds it is
  higher;

* **media acc**: accuracy on the media questions; **needs-media acc**: on those whose answer is not the prior
  (only the medium gives it); **overall**: every test item (text-only sums included);
* **MM gain**: the multimodal gain of the validation diagnostics at the chosen checkpoint (accuracy with the
  medium minus with it dropped, on `eval.diagnostics_max_samples` items); **media grad share**: the share of the
  adapter's A-gradient from the medium's token positions (the same diagnostics);
* step time is not in the table: these runs go `--jobs` at a time on a shared machine, so their timings compare
  loads, not methods (kept in the JSON as `step_ratio`); `benchmarks/mllm_balance_cost.py` is the interleaved
  measurement.

Each run is one `python -m mmbalance_llm train` process (1 thread); finished runs are kept under `--work` and
reused, so adding a method reruns only its rows.

    python benchmarks/mllm_balance.py --seeds 0,1,2,3,4 --jobs 2 --families llava,qwen2_audio
writes benchmarks/results/mllm_balance.{json,md}.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import fmt, mean_std, write_result  # noqa: E402

MEDIUM = {"llava": "image", "qwen2_audio": "audio"}
# name -> (adapter, balance section, extra recipe keys). Methods not registered in this checkout are skipped.
METHODS = {
    "lora": ("lora", {"method": "none"}, {}),
    "moka": ("moka", {"method": "none"}, {}),
    "moka + mllm_contrast": ("moka", {"method": "mllm_contrast", "weight": 0.1}, {}),
    "moka + mllm_ogm": ("moka", {"method": "mllm_ogm", "alpha": 0.8}, {}),
    "lora + mllm_ogm": ("lora", {"method": "mllm_ogm", "alpha": 0.8}, {}),
    "moka + mllm_contrast every 4": ("moka", {"method": "mllm_contrast", "weight": 0.1, "every_n_steps": 4}, {}),
    "moka + mllm_ogm every 4": ("moka", {"method": "mllm_ogm", "alpha": 0.8, "every_n_steps": 4}, {}),
    "moka + rollingq": ("moka", {"method": "rollingq", "r_time": 1}, {}),
    "moka + commit": ("moka", {"method": "commit"}, {"model": {"freeze": {"projector": False}}}),
    "imod": ("imod", {"method": "none"}, {}),
}
PLAIN = {"lora": "lora", "moka": "moka", "imod": "lora"}


def recipe(work: str, family: str, name: str, seed: int, prior: float, epochs: int) -> dict:
    adapter, balance, extra = METHODS[name]
    medium = MEDIUM[family]
    data = os.path.join(work, "data", f"{family}_prior{prior}_seed{seed}")
    raw = {
        "task": "sft", "output_dir": os.path.join(work, "runs", family, name.replace(" + ", "+").replace(" ", "_"), f"seed{seed}"),
        "adapter": adapter, "adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "model": {"name_or_path": os.path.join(work, f"tiny_{family}_seed{seed}"), "build_tiny": family},
        "data": {"train": os.path.join(data, "train.json"), "validation": os.path.join(data, "validation.json"),
                 "test": os.path.join(data, "test.json"), "max_length": 128,
                 "cache_dir": os.path.join(work, "cache"),
                 "generate": {"modalities": [medium], "n_train": 600, "n_validation": 100, "n_test": 200,
                              "seed": seed, "text_prior": prior, "test_prior": "absent"}},
        "train": {"num_train_epochs": epochs, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
                  "learning_rate": 3e-3, "warmup_ratio": 0.05, "logging_steps": 50, "seed": seed,
                  "progress": False, "plots": False, "num_threads": 1},
        "balance": dict(balance),
        "eval": {"accuracy": "options", "diagnostics_max_samples": 16},
    }
    for section, values in extra.items():
        for k, v in values.items():
            if isinstance(v, dict):
                raw[section].setdefault(k, {}).update(v)
            else:
                raw[section][k] = v
    return raw


def run_one(raw: dict) -> dict:
    out = raw["output_dir"]
    done = os.path.join(out, "final_metrics.json")
    if os.path.exists(done) and os.path.exists(os.path.join(out, "bench_recipe.yaml")) and \
            yaml.safe_load(open(os.path.join(out, "bench_recipe.yaml"))) == raw:
        return json.load(open(done))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "..", os.path.basename(out) + ".yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmbalance_llm", "train", path], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{out}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "bench_recipe.yaml"), "w") as fh:
        yaml.safe_dump(raw, fh)
    return json.load(open(done))


def row_values(final: dict, timing: dict, plain_timing: dict | None, medium: str) -> dict:
    test, val = final.get("test", {}), final.get("validation", {})
    step = timing.get("mean_step_seconds")
    base = (plain_timing or {}).get("mean_step_seconds")
    return {"media": test.get(f"accuracy_{medium}"), "needs_media": test.get(f"accuracy_{medium}_nonprior"),
            "overall": test.get("accuracy"),
            "val_needs_media": val.get(f"accuracy_{medium}_nonprior"),
            "gain": val.get("diagnostics/reliance/multimodal_gain"),
            "grad_share": val.get(f"diagnostics/grad_share/{medium}"),
            "step_ratio": (step / base) if step and base else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--families", default="llava,qwen2_audio")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--text-prior", type=float, default=0.8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default=os.path.join("runs", "bench_mllm_balance"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "mllm_balance"))
    args = p.parse_args(argv)
    from mmbalance_llm.balance import available_methods

    known = set(available_methods())
    seeds = [int(s) for s in args.seeds.split(",")]
    families = [f for f in args.families.split(",") if f]
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"unknown method row(s) {unknown}; choose from {list(METHODS)}")
    skipped = [m for m in names if METHODS[m][1]["method"] not in known]
    names = [m for m in names if m not in skipped]
    for m in skipped:
        print(f"skipping {m!r}: balance.method {METHODS[m][1]['method']!r} is not in this checkout")
    work = os.path.abspath(args.work)
    # assets (tiny twin + data) are built once per family and seed, before any parallel run, so no two runs race
    # to write them and every run of a seed starts from the same weights and data
    from mmbalance_llm.config import load_recipe
    from mmbalance_llm.train.tasks import make_task

    for fam in families:
        for s in seeds:
            make_task(load_recipe(recipe(work, fam, "moka", s, args.text_prior, args.epochs))).prepare_assets()
    jobs = [(fam, m, s) for fam in families for m in names for s in seeds]
    raws = {j: recipe(work, j[0], j[1], j[2], args.text_prior, args.epochs) for j in jobs}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        finals = dict(zip(jobs, pool.map(lambda j: run_one(raws[j]), jobs)))
    timing = {j: json.load(open(os.path.join(raws[j]["output_dir"], "timing.json"))) for j in jobs}

    rows, md = {}, []
    cols = ("media", "needs_media", "overall", "gain", "grad_share", "step_ratio")
    for fam in families:
        medium = MEDIUM[fam]
        md += [f"\n**Tiny {'LLaVA' if fam == 'llava' else 'Qwen2-Audio'}** ({medium}; text prior "
               f"{args.text_prior}, test without the prior; {len(seeds)} seeds, {args.epochs} epochs)\n",
               f"| run | {medium} acc | needs-{medium} acc | paired Δ needs-{medium} vs plain (seeds better) | "
               f"overall acc | MM gain (val) | {medium} grad share (val) |", "|---|---|---|---|---|---|---|"]
        for m in names:
            adapter = METHODS[m][0]
            per_seed = [row_values(finals[(fam, m, s)], timing[(fam, m, s)],
                                   timing.get((fam, PLAIN[adapter], s)), medium) for s in seeds]
            stats = {c: mean_std([v[c] for v in per_seed]) for c in cols}
            plain = PLAIN[adapter]
            paired = "-"
            if plain != m and plain in names:  # the same seed is the same data and twin: compare seed by seed
                base = [row_values(finals[(fam, plain, s)], {}, None, medium)["needs_media"] for s in seeds]
                deltas = [v["needs_media"] - b for v, b in zip(per_seed, base)]
                better = sum(d > 0 for d in deltas)
                paired = f"{fmt(mean_std(deltas))} ({better}/{len(deltas)})"
                stats["paired_delta"] = mean_std(deltas)
            rows[f"{fam}/{m}"] = {"per_seed": per_seed, **{c: stats[c] for c in stats}}
            md.append(f"| {m} | {fmt(stats['media'])} | {fmt(stats['needs_media'])} | {paired} | "
                      f"{fmt(stats['overall'])} | {fmt(stats['gain'])} | {fmt(stats['grad_share'])} |")
    text = "\n".join(md).strip()
    write_result(args.out, text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
