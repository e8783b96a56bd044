"""`mmbalance compare`: train several methods (and seeds) on the same data and recipe, then tabulate.

With no arguments it runs on the built-in synthetic imbalance preset: the plain baseline,
`unimodal_aux` and `ogm_ge`, plus every modality trained alone as the reference for how far joint
training leaves each modality behind. Outputs: `compare.json`, `compare.md`, `curves.png` (per-modality
validation accuracy per epoch, first seed) and `pareto.png` (fused accuracy against imbalance).
"""
from __future__ import annotations

import json
import os
import statistics

from mmbalance_llm.config import apply_overrides, read_yaml, recipe_from_dict
from mmbalance_llm.train.io import write_json_atomic, write_text_atomic

DEFAULT_METHODS = ("none", "unimodal_aux", "ogm_ge")

# The recipe `mmbalance compare` uses when none is given; recipes/synthetic/baseline.yaml holds the same
# model and train sections (a test keeps them equal).
DEFAULT_RECIPE = {
    "model": {"encoder": "default", "feature_dim": 64, "hidden_dim": 128, "num_layers": 2, "fusion": "concat"},
    "data": {"path": None},
    "train": {"epochs": 15, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.01, "optimizer": "adamw",
              "seed": 0},
    "balance": {"method": "none"},
}


def _stats(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean, std, pct=True) -> str:
    if mean is None:
        return "-"
    scale = 100 if pct else 1
    digits = 1 if pct else 3
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def summarise(results: dict, modalities: list) -> dict:
    """results[name] = list of final_metrics (one per seed) -> mean/std per column (test split)."""
    rows = {}
    for name, runs in results.items():
        tests = [r.get("test") or {} for r in runs]
        row = {"seeds": len(runs)}
        for key in ("accuracy", "macro_f1", "imbalance"):
            row[key], row[key + "_std"] = _stats([t.get(key) for t in tests])
        row["unimodal_accuracy"] = {}
        for m in modalities:
            mean, std = _stats([t.get("unimodal_accuracy", {}).get(m) for t in tests])
            row["unimodal_accuracy"][m] = {"mean": mean, "std": std}
        rows[name] = row
    return rows


def markdown_table(rows: dict, modalities: list, alone: dict | None = None) -> str:
    head = ["method", "fused acc", "macro-F1"] + [f"{m} unimodal acc" for m in modalities] + ["imbalance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, _fmt(r["accuracy"], r["accuracy_std"]), _fmt(r["macro_f1"], r["macro_f1_std"])]
        cells += [_fmt(r["unimodal_accuracy"][m]["mean"], r["unimodal_accuracy"][m]["std"]) for m in modalities]
        cells.append(_fmt(r["imbalance"], r["imbalance_std"], pct=False))
        lines.append("| " + " | ".join(cells) + " |")
    if alone:
        cells = ["each modality trained alone", "-", "-"]
        cells += [_fmt(alone[m]["accuracy"], alone[m]["accuracy_std"]) if m in alone else "-" for m in modalities]
        cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_compare(output_dir: str, methods=DEFAULT_METHODS, seeds=(0,), recipe_path: str | None = None,
                data_path: str | None = None, preset: str = "av_imbalance", alone: bool = True,
                overrides: list | None = None, method_params: dict | None = None, echo=print) -> dict:
    from mmbalance_llm.data.synthetic import ensure_preset
    from mmbalance_llm.train.trainer import Trainer

    base = read_yaml(recipe_path) if recipe_path else json.loads(json.dumps(DEFAULT_RECIPE))
    base = apply_overrides(base, overrides or [])
    if data_path is None and not (base.get("data") or {}).get("path"):
        data_path = ensure_preset(os.path.join(output_dir, "data", preset), preset=preset)
    if data_path is not None:
        base.setdefault("data", {})["path"] = data_path
    os.makedirs(output_dir, exist_ok=True)

    def run(name: str, seed: int, balance: dict, extra: dict | None = None) -> dict:
        raw = json.loads(json.dumps(base))
        raw["balance"] = balance
        raw.setdefault("train", {})["seed"] = seed
        raw["output_dir"] = os.path.join(output_dir, "runs", f"{name}-seed{seed}")
        for section, values in (extra or {}).items():
            raw.setdefault(section, {}).update(values)
        trainer = Trainer(recipe_from_dict(raw))
        final = trainer.fit()
        final["timing"] = trainer.timing
        final["output_dir"] = raw["output_dir"]
        test = final.get("test") or {}
        echo(f"[compare] {name} seed {seed}: test acc {test.get('accuracy', float('nan')):.4f} "
             f"unimodal {json.dumps({k: round(v, 4) for k, v in test.get('unimodal_accuracy', {}).items()})}")
        return final

    results, modalities = {}, None
    for method in methods:
        balance = {"method": method, **((method_params or {}).get(method, {}))}
        results[method] = [run(method, seed, balance) for seed in seeds]
        modalities = modalities or list(results[method][0]["test"]["unimodal_accuracy"])
    alone_rows = {}
    if alone:
        for m in modalities:
            finals = [run(f"alone-{m}", seed, {"method": "none"}, {"data": {"modalities": [m]}}) for seed in seeds]
            mean, std = _stats([f["test"]["accuracy"] for f in finals])
            alone_rows[m] = {"accuracy": mean, "accuracy_std": std}
    rows = summarise(results, modalities)
    table = markdown_table(rows, modalities, alone_rows)
    summary = {"modalities": modalities, "seeds": list(seeds), "rows": rows, "alone": alone_rows,
               "runs": {k: [r["output_dir"] for r in v] for k, v in results.items()}}
    write_json_atomic(os.path.join(output_dir, "compare.json"), summary)
    write_text_atomic(os.path.join(output_dir, "compare.md"), table)

    from mmbalance_llm.eval.plots import plot_compare_curves, plot_pareto

    plot_compare_curves({k: os.path.join(v[0]["output_dir"], "metrics.jsonl") for k, v in results.items()},
                        os.path.join(output_dir, "curves.png"), modalities, alone_rows)
    plot_pareto({k: r for k, r in rows.items() if r["imbalance"] is not None}, os.path.join(output_dir, "pareto.png"))
    echo("\n" + table)
    echo(f"[compare] wrote {output_dir}/compare.md, compare.json, curves.png, pareto.png")
    summary["results"] = results
    return summary
