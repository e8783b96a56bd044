"""PNG plots of a run (per-modality accuracy per epoch) and of a comparison (accuracy vs imbalance)."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def eval_rows(metrics_path: str, split: str = "validation") -> list:
    return [r for r in read_jsonl(metrics_path) if r.get("split") == split]


def plot_run(metrics_path: str, out_png: str, title: str = "") -> str:
    """Fused and per-modality unimodal validation accuracy per epoch."""
    rows = eval_rows(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["accuracy"] for r in rows], "k-", lw=2, label="fused")
        for m in rows[0].get("unimodal_accuracy", {}):
            line, = ax.plot(epochs, [r["unimodal_accuracy"][m] for r in rows], "--", label=f"{m} (unimodal)")
            if "unimodal_probe_accuracy" in rows[0]:
                ax.plot(epochs, [r["unimodal_probe_accuracy"][m] for r in rows], ":", color=line.get_color(),
                        label=f"{m} (encoder probe)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title or "accuracy per modality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_sft_run(metrics_path: str, out_png: str, title: str = "") -> str:
    """SFT: validation answer accuracy (overall and per `needs`) and loss per step."""
    rows = eval_rows(metrics_path)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    if rows:
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["accuracy"] for r in rows], "k-", lw=2, label="all")
        for k in sorted({k for r in rows for k in r if k.startswith("accuracy_")}):
            ax.plot(steps, [r.get(k) for r in rows], "--", label=k[len("accuracy_"):])
        bx.plot(steps, [r["loss"] for r in rows], "k-")
    for a, label in ((ax, "validation answer accuracy"), (bx, "validation loss")):
        a.set_xlabel("step")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title or "SFT")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_compare_curves(runs: dict, out_png: str, modalities: list, alone: dict | None = None) -> str:
    """One panel per modality: its unimodal validation accuracy per epoch for every method (solid) and
    its encoder-probe accuracy (dotted, same colour), with the modality's trained-alone test accuracy as
    a grey dashed reference line when given. One legend below the panels (many methods fit)."""
    n = len(modalities) + 1
    ncol = min(6, max(1, len(runs)))
    legend_rows = -(-(len(runs) + 1) // ncol)
    height = 3.6 + 0.2 * legend_rows
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, height), sharey=True)
    colours = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    handles, ref = [], None
    for i, (name, metrics_path) in enumerate(runs.items()):
        rows = eval_rows(metrics_path)
        if not rows:
            continue
        colour = colours(i % colours.N)
        epochs = [r["epoch"] for r in rows]
        line, = axes[0].plot(epochs, [r["accuracy"] for r in rows], color=colour, label=name)
        handles.append(line)
        for ax, m in zip(axes[1:], modalities):
            ax.plot(epochs, [r["unimodal_accuracy"][m] for r in rows], color=colour)
            if "unimodal_probe_accuracy" in rows[0]:
                ax.plot(epochs, [r["unimodal_probe_accuracy"][m] for r in rows], ":", color=colour)
    axes[0].set_title("fused")
    for ax, m in zip(axes[1:], modalities):
        ax.set_title(f"{m}: unimodal (solid), encoder probe (dotted)", fontsize=9)
        if alone and alone.get(m, {}).get("accuracy") is not None:
            ref = ax.axhline(alone[m]["accuracy"], color="gray", ls="--", lw=1, label="trained alone (test)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    fig.legend(handles=handles + ([ref] if ref is not None else []), loc="lower center", ncol=ncol, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.15) / height, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_pareto(points: dict, out_png: str) -> str:
    """Fused test accuracy against imbalance, one point per method (mean, with std error bars)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, p in points.items():
        ax.errorbar(p["imbalance"], p["accuracy"], xerr=p.get("imbalance_std", 0), yerr=p.get("accuracy_std", 0),
                    fmt="o", capsize=3)
        ax.annotate(name, (p["imbalance"], p["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("imbalance (Shapley, lower is more balanced)")
    ax.set_ylabel("fused test accuracy")
    ax.set_title("performance vs balance")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
