"""Attention-fusion diagnostics as PNG: the fusion query's attention share of each modality per epoch
(read from the `attention` block the FusionTransformer adds to every validation line of metrics.jsonl)
and the AIR curve, one panel per run, optionally averaged over seeds."""
from __future__ import annotations

import statistics

from mmbalance_llm.eval.plots import eval_rows, plt


def attention_curves(metrics_path: str, key: str = "share_per_token") -> dict:
    """{"epoch": [...], "air": [...], "share": {m: [...]}} from a run's validation lines."""
    rows = [r for r in eval_rows(metrics_path) if "attention" in r]
    out = {"epoch": [r["epoch"] for r in rows], "air": [r["attention"]["air"] for r in rows], "share": {}}
    for r in rows:
        for m, v in r["attention"][key].items():
            out["share"].setdefault(m, []).append(v)
    return out


def mean_curves(curves: list) -> dict:
    """Average curves of several seeds (epochs cut to the shortest run); adds "*_std" entries."""
    n = min(len(c["epoch"]) for c in curves)
    avg = lambda xs: [statistics.fmean(v) for v in zip(*[x[:n] for x in xs])]  # noqa: E731
    std = lambda xs: [statistics.pstdev(v) for v in zip(*[x[:n] for x in xs])]  # noqa: E731
    mods = list(curves[0]["share"])
    return {"epoch": curves[0]["epoch"][:n], "air": avg([c["air"] for c in curves]),
            "air_std": std([c["air"] for c in curves]),
            "share": {m: avg([c["share"][m] for c in curves]) for m in mods},
            "share_std": {m: std([c["share"][m] for c in curves]) for m in mods}}


def plot_attention_shares(runs: dict, out_png: str, title: str = "") -> str:
    """`runs`: {name: curves (from attention_curves / mean_curves)}. One column per run: the share of
    each modality on top (per-token normalised, so 0.5 is balanced for M = 2), AIR below."""
    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(4.4 * n, 5.6), sharex=True, sharey="row", squeeze=False)
    for col, (name, c) in enumerate(runs.items()):
        ax, ax_air = axes[0][col], axes[1][col]
        for m, ys in c["share"].items():
            ax.plot(c["epoch"], ys, marker="o", ms=3, label=m)
            if "share_std" in c:
                lo = [y - s for y, s in zip(ys, c["share_std"][m])]
                hi = [y + s for y, s in zip(ys, c["share_std"][m])]
                ax.fill_between(c["epoch"], lo, hi, alpha=0.2)
        ax.axhline(1.0 / max(1, len(c["share"])), color="grey", lw=0.8, ls=":")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax_air.plot(c["epoch"], c["air"], "k-", marker="o", ms=3)
        ax_air.set_xlabel("epoch")
        ax_air.grid(alpha=0.3)
    axes[0][0].set_ylabel("query attention share\n(per token, normalised)")
    axes[1][0].set_ylabel("AIR (key alignment gap)")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_run_attention(metrics_path: str, out_png: str, title: str = "") -> str:
    return plot_attention_shares({title or "run": attention_curves(metrics_path)}, out_png)
