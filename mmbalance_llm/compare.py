"""`mmbalance compare`: train several methods (and seeds) on the same data, then tabulate.

Each method is built from its own recipe when `--recipes DIR` is given (`DIR/<method>.yaml`, the plain
run from `DIR/baseline.yaml` when there is no `none.yaml`), else from one base recipe (`--recipe`, or
the built-in synthetic baseline) with the method's built-in defaults. `--data` and `key=value` overrides
apply to every run. Every modality is also trained alone (from the baseline recipe) as the reference
for how far joint training leaves each modality behind. With `--jobs N` the runs go to N worker
processes side by side (each trains its share of the runs in turn, OMP_NUM_THREADS or cores / N threads
each); with 1 they run in this process (which may itself be one of an `accelerate launch` group). From a
Python script, call `run_compare(..., jobs=N)` under `if __name__ == "__main__":`: the spawned workers
re-import the main module.

The table reports, on the test split of the checkpoint chosen on validation: fused accuracy, macro-F1,
both unimodal metrics (`unimodal_accuracy`, the fused predictor's own unimodal path, and
`unimodal_probe_accuracy`, a fresh linear probe on the modality's frozen encoder features), the
Shapley imbalance, the probe imbalance, the chosen epoch with whether the method had acted by then
(eval/activity.py), and the mean optimizer-step time against `none` of the same seed.

Outputs: `compare.json`, `compare.md`, `curves.png` (per-modality validation curves, first seed) and
`pareto.png` (fused accuracy against imbalance).

Each feature dataset is read and validated once per process (`shared_data`): the runs of every method
and seed, and the single-modality runs (a subset of the columns), share the loaded tensors. With
`--jobs N` that is once per worker.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import statistics
import multiprocessing

from mmbalance_llm.config import RecipeError, apply_overrides, read_yaml, recipe_from_dict
from mmbalance_llm.eval.activity import active_at, first_active_epoch
from mmbalance_llm.train.io import write_json_atomic, write_text_atomic

DEFAULT_METHODS = ("none", "unimodal_aux", "ogm_ge")

# The recipe `mmbalance compare` uses when none is given; recipes/synthetic/baseline.yaml holds the same
# model and train sections (a test keeps them equal).
DEFAULT_RECIPE = {
    "model": {"encoder": "default", "feature_dim": 64, "hidden_dim": 128, "num_layers": 2, "fusion": "concat"},
    "data": {"path": None},
    "train": {"num_train_epochs": 15, "per_device_train_batch_size": 64, "learning_rate": 1e-3,
              "weight_decay": 0.01, "optimizer": "adamw", "seed": 0},
    "balance": {"method": "none"},
}


def _stats(values: list) -> tuple:
    """(mean, std) over seeds; std is None for a single value (nothing to spread)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean, std, pct=True) -> str:
    if mean is None:
        return "-"
    scale = 100 if pct else 1
    digits = 1 if pct else 3
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def method_recipes(methods, recipes_dir: str | None, base: dict) -> dict:
    """method -> raw recipe dict. Raises a one-line RecipeError for a method without a recipe in DIR."""
    out = {}
    for method in methods:
        if recipes_dir is None:
            raw = json.loads(json.dumps(base))
            raw["balance"] = {"method": method}
        else:
            names = [f"{method}.yaml"] + (["baseline.yaml"] if method == "none" else [])
            paths = [os.path.join(recipes_dir, n) for n in names if os.path.isfile(os.path.join(recipes_dir, n))]
            if not paths:
                raise RecipeError(f"--recipes '{recipes_dir}' has no {names[0]} for method '{method}'")
            raw = read_yaml(paths[0])
            if (raw.get("balance") or {}).get("method", "none") != method:
                raise RecipeError(f"recipe '{paths[0]}': balance.method is "
                                  f"'{(raw.get('balance') or {}).get('method', 'none')}', not '{method}'")
        out[method] = raw
    return out


def baseline_recipe(recipes_dir: str | None, base: dict) -> dict:
    if recipes_dir is not None:
        for name in ("baseline.yaml", "none.yaml"):
            if os.path.isfile(os.path.join(recipes_dir, name)):
                return read_yaml(os.path.join(recipes_dir, name))
    raw = json.loads(json.dumps(base))
    raw["balance"] = {"method": "none"}
    return raw


def summarise(results: dict, modalities: list, baseline: str = "none") -> dict:
    """results[name] = list of final_metrics (one per seed, with `timing`, `balance`, `epochs`) ->
    mean/std per column (test split), chosen epochs, activity flags and the step-time ratio."""
    base_step = {r["seed"]: (r.get("timing") or {}).get("mean_step_seconds") for r in results.get(baseline, [])}
    rows = {}
    for name, runs in results.items():
        tests = [r.get("test") or {} for r in runs]
        row = {"seeds": len(runs)}
        for key in ("accuracy", "macro_f1", "imbalance", "imbalance_probe", "imbalance_unimodal"):
            row[key], row[key + "_std"] = _stats([t.get(key) for t in tests])
        for metric in ("unimodal_accuracy", "unimodal_probe_accuracy"):
            row[metric] = {}
            for m in modalities:
                mean, std = _stats([(t.get(metric) or {}).get(m) for t in tests])
                row[metric][m] = {"mean": mean, "std": std}
        method = runs[0].get("method", name) if runs else name
        row["best_epoch"] = [r.get("best_epoch") for r in runs]
        row["first_active_epoch"] = first_active_epoch(method, runs[0].get("balance"), runs[0].get("epochs")) \
            if runs else None
        row["active_at_best"] = [active_at(method, r.get("balance"), r.get("best_epoch"), r.get("epochs"))
                                 for r in runs]
        ratios = [(r.get("timing") or {}).get("mean_step_seconds", 0) / base_step[r["seed"]]
                  for r in runs if base_step.get(r.get("seed"))]
        row["step_time_ratio"], row["step_time_ratio_std"] = _stats(ratios)
        rows[name] = row
    return rows


def _active_cell(row: dict) -> str:
    flags = [f for f in row["active_at_best"] if f is not None]
    if not flags:
        return "-"
    first = row["first_active_epoch"]
    text = f"{sum(flags)}/{len(flags)}"
    return text + (f" (acts from {first})" if first and first > 1 else "") + (" (never acts)" if first is None else "")


def markdown_table(rows: dict, modalities: list, alone: dict | None = None) -> str:
    head = (["method", "fused acc", "macro-F1"] + [f"{m} unimodal acc" for m in modalities]
            + [f"{m} probe acc" for m in modalities]
            + ["imbalance", "probe imbalance", "best epoch", "active at best", "step time ×"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, _fmt(r["accuracy"], r["accuracy_std"]), _fmt(r["macro_f1"], r["macro_f1_std"])]
        for metric in ("unimodal_accuracy", "unimodal_probe_accuracy"):
            cells += [_fmt(r[metric][m]["mean"], r[metric][m]["std"]) for m in modalities]
        cells.append(_fmt(r["imbalance"], r["imbalance_std"], pct=False))
        cells.append(_fmt(r["imbalance_probe"], r["imbalance_probe_std"], pct=False))
        cells.append(", ".join("-" if e is None else str(e) for e in r["best_epoch"]))
        cells.append(_active_cell(r))
        ratio = r["step_time_ratio"]
        cells.append("-" if ratio is None else f"{ratio:.2f}" + ("" if r["step_time_ratio_std"] is None
                                                                  else f" ± {r['step_time_ratio_std']:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    if alone:
        cells = ["each modality trained alone", "-", "-"]
        cells += [_fmt(alone[m]["accuracy"], alone[m]["accuracy_std"]) if m in alone else "-" for m in modalities]
        cells += ["-"] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stale_checkpoint_warnings(rows: dict, seeds: list) -> list:
    """One line per method whose chosen checkpoint predates its first active epoch on some seed."""
    notes = []
    for name, r in rows.items():
        bad = [str(s) for s, flag in zip(seeds, r["active_at_best"]) if flag is False]
        if bad:
            first = r["first_active_epoch"]
            when = f"its first active epoch ({first})" if first else "any intervention (it never acts in this run)"
            notes.append(f"- **{name}**: on seed(s) {', '.join(bad)} the checkpoint chosen on validation "
                         f"(epoch {', '.join(str(e) for e, f in zip(r['best_epoch'], r['active_at_best']) if f is False)}) "
                         f"predates {when}: those numbers are plain joint training's, not the method's.")
    return notes


def same_as_baseline(results: dict, baseline: str = "none") -> list:
    """One line per method whose test metrics equal the baseline's exactly on some seed (same seed): the
    method changed nothing the evaluation can see."""
    keys = ("accuracy", "macro_f1", "unimodal_accuracy", "unimodal_probe_accuracy", "imbalance")
    base = {r.get("seed"): r.get("test") or {} for r in results.get(baseline, [])}
    notes = []
    for name, runs in results.items():
        if name == baseline:
            continue
        same = [str(r.get("seed")) for r in runs if r.get("seed") in base and r.get("test")
                and all(r["test"].get(k) == base[r["seed"]].get(k) for k in keys)]
        if same:
            notes.append(f"- **{name}**: test metrics identical to `{baseline}` on seed(s) {', '.join(same)}.")
    return notes


_LOADED: dict = {}  # this process's feature datasets: data key -> LoadedData (shared_data)


def _data_key(recipe, seed=None) -> str:
    data = dataclasses.asdict(recipe.data)
    data.pop("modalities")
    data["path"] = os.path.abspath(data["path"])
    return json.dumps([data, recipe.model.num_classes, seed], sort_keys=True, default=str)


def shared_data(recipe):
    """The run's feature splits from this process's cache, read and validated once per data folder and
    settings (what `load_feature_data` returns, with only `data.modalities` of the columns); None when the
    run must load its own (raw media, datasets given from Python, or modalities the cached read lacks).
    The tensors are shared, never copied: the loop and the methods only index them."""
    from mmbalance_llm.data.features import FeatureDataset, LoadedData, data_warnings, load_feature_data

    d = recipe.data
    if recipe.task != "classify" or d.path is None or d.media or not os.path.exists(d.path):
        return None
    loaded = _LOADED.get(_data_key(recipe)) or _LOADED.get(_data_key(recipe, recipe.train.seed))
    if loaded is None:
        loaded = load_feature_data(d, recipe.model.num_classes, seed=recipe.train.seed)
        carved = any(n.startswith(f"no '{d.validation_split}' split") for n in loaded.notes)  # depends on the seed
        _LOADED[_data_key(recipe, recipe.train.seed if carved else None)] = loaded
    wanted = list(d.modalities or loaded.modalities)
    if wanted == loaded.modalities:
        return loaded
    if not set(wanted) <= set(loaded.modalities):
        return None

    def part(ds):
        return None if ds is None else FeatureDataset({m: ds.tensors[m] for m in wanted}, ds.labels, ds.split)

    train = part(loaded.train)
    notes = [n for n in loaded.notes if not n.startswith("warning:")] + data_warnings(train)
    return LoadedData(train, part(loaded.validation), part(loaded.test), wanted, loaded.num_classes,
                      {m: loaded.input_shapes[m] for m in wanted}, notes)


def _worker_setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def train_job(raw: dict) -> tuple:
    """One run in a worker process: (final_metrics, timing). Errors come back as one-line RuntimeErrors."""
    from mmbalance_llm.train.trainer import Trainer

    raw = json.loads(json.dumps(raw))
    raw.setdefault("train", {})["progress"] = False
    try:
        recipe = recipe_from_dict(raw)
        trainer = Trainer(recipe, datasets=shared_data(recipe))
        final = trainer.fit()
    except Exception as exc:  # the pool would re-raise it without saying which run
        raise RuntimeError(f"run '{raw.get('output_dir')}' failed: {type(exc).__name__}: {exc}") from None
    return final, trainer.timing


def run_compare(output_dir: str, methods=DEFAULT_METHODS, seeds=(0,), recipe_path: str | None = None,
                data_path: str | None = None, preset: str = "av_imbalance", alone: bool = True,
                overrides: list | None = None, method_params: dict | None = None, echo=print,
                recipes_dir: str | None = None, jobs: int = 1) -> dict:
    from mmbalance_llm.data.synthetic import ensure_preset
    from mmbalance_llm.train.setup import check_launch, process_state

    _LOADED.clear()  # one compare's reads: a data folder rewritten since an earlier compare is read again
    state = process_state()  # joins the launcher's process group when run under `accelerate launch`
    check_launch(state)
    if jobs > 1 and state.num_processes > 1:
        raise ValueError("--jobs > 1 starts its own processes; run it without `accelerate launch`")
    main = state.is_main_process
    if not main:
        echo = lambda *_: None  # noqa: E731  (one report, from the main process)
    if recipes_dir is not None and not os.path.isdir(recipes_dir):
        raise RecipeError(f"--recipes '{recipes_dir}' is not a folder")

    base = read_yaml(recipe_path) if recipe_path else json.loads(json.dumps(DEFAULT_RECIPE))
    recipes = method_recipes(methods, recipes_dir, base)
    baseline = baseline_recipe(recipes_dir, base)
    for name, extra in (method_params or {}).items():
        recipes[name].setdefault("balance", {}).update(extra)
    if data_path is None and recipes_dir is None and not (apply_overrides(base, overrides or []).get("data")
                                                          or {}).get("path"):
        with state.main_process_first():  # one process writes the data, the others then read it
            data_path = ensure_preset(os.path.join(output_dir, "data", preset), preset=preset)

    def prepare(name: str, seed: int, raw: dict, extra: dict | None = None) -> dict:
        raw = apply_overrides(raw, overrides or [])
        if data_path is not None:
            raw.setdefault("data", {})["path"] = data_path
        raw.setdefault("train", {})["seed"] = seed
        raw["output_dir"] = os.path.join(output_dir, "runs", f"{name}-seed{seed}")
        for section, values in (extra or {}).items():
            raw.setdefault(section, {}).update(values)
        return raw

    jobs_list = [(m, s, prepare(m, s, recipes[m])) for m in methods for s in seeds]
    recipe_objs = {(n, s): recipe_from_dict(raw) for n, s, raw in jobs_list}  # every recipe checked up front
    os.makedirs(output_dir, exist_ok=True)

    def finish(name, seed, raw, final, timing) -> dict:
        final["timing"] = timing
        final["output_dir"] = raw["output_dir"]
        recipe = recipe_objs.get((name, seed)) or recipe_from_dict(raw)
        epochs = getattr(recipe.train, "num_train_epochs", None) or getattr(recipe.train, "epochs", None)
        final["balance"], final["epochs"] = dict(recipe.balance), epochs
        test = final.get("test") or {}
        echo(f"[compare] {name} seed {seed}: test acc {test.get('accuracy', float('nan')):.4f} "
             f"unimodal {json.dumps({k: round(v, 4) for k, v in test.get('unimodal_accuracy', {}).items()})} "
             f"probe {json.dumps({k: round(v, 4) for k, v in (test.get('unimodal_probe_accuracy') or {}).items()})}")
        return final

    def run_here(job) -> dict:
        from mmbalance_llm.train.trainer import Trainer

        name, seed, raw = job
        recipe = recipe_from_dict(raw)
        trainer = Trainer(recipe, datasets=shared_data(recipe))
        final = trainer.fit()
        return finish(name, seed, raw, final, trainer.timing)

    def run_all(batch: list) -> list:
        if jobs <= 1:
            return [run_here(j) for j in batch]
        # Worker processes (spawned, so no forked torch state) each train many runs in turn: the
        # package imports are paid once per worker, not once per run.
        ctx = multiprocessing.get_context("spawn")
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // jobs))
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_setup,
                                                    initargs=(threads,)) as pool:
            futures = [pool.submit(train_job, raw) for _, _, raw in batch]
            return [finish(name, seed, raw, *fut.result()) for (name, seed, raw), fut in zip(batch, futures)]

    finals = run_all(jobs_list)
    results = {}
    for (name, _, _), final in zip(jobs_list, finals):
        results.setdefault(name, []).append(final)
    modalities = list(results[methods[0]][0]["test"]["unimodal_accuracy"])
    alone_rows = {}
    if alone:
        alone_jobs = [(f"alone-{m}", s, prepare(f"alone-{m}", s, baseline, {"data": {"modalities": [m]}}))
                      for m in modalities for s in seeds]
        for raw in alone_jobs:
            recipe_objs[(raw[0], raw[1])] = recipe_from_dict(raw[2])
        alone_finals = run_all(alone_jobs)
        for m in modalities:
            accs = [f["test"]["accuracy"] for (n, _, _), f in zip(alone_jobs, alone_finals) if n == f"alone-{m}"]
            mean, std = _stats(accs)
            alone_rows[m] = {"accuracy": mean, "accuracy_std": std}
    rows = summarise(results, modalities)
    warnings = stale_checkpoint_warnings(rows, list(seeds))
    identical = same_as_baseline(results)
    table = markdown_table(rows, modalities, alone_rows)
    if warnings:
        table += "\nCheckpoints chosen before the method acted:\n\n" + "\n".join(warnings) + "\n"
    if identical:
        table += "\nMethods whose runs equal the baseline's:\n\n" + "\n".join(identical) + "\n"
    summary = {"modalities": modalities, "seeds": list(seeds), "rows": rows, "alone": alone_rows,
               "runs": {k: [r["output_dir"] for r in v] for k, v in results.items()},
               "warnings": warnings, "same_as_baseline": identical, "world_size": state.num_processes, "jobs": jobs,
               "recipes": recipes_dir}
    if main:
        from mmbalance_llm.eval.plots import plot_compare_curves, plot_pareto

        write_json_atomic(os.path.join(output_dir, "compare.json"), summary)
        write_text_atomic(os.path.join(output_dir, "compare.md"), table)
        plot_compare_curves({k: os.path.join(v[0]["output_dir"], "metrics.jsonl") for k, v in results.items()},
                            os.path.join(output_dir, "curves.png"), modalities, alone_rows)
        plot_pareto({k: r for k, r in rows.items() if r["imbalance"] is not None},
                    os.path.join(output_dir, "pareto.png"))
        echo("\n" + table)
        echo(f"[compare] wrote {output_dir}/compare.md, compare.json, curves.png, pareto.png")
    state.wait_for_everyone()
    _LOADED.clear()
    summary["results"] = results
    return summary
