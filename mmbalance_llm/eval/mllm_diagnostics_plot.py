"""PNG of an SFT run's per-modality diagnostics (the `diagnostics/...` keys of its validation rows): reliance,
adapter gradient share and answer-position attention share per validation step."""
from __future__ import annotations

from mmbalance_llm.eval.plots import eval_rows, plt

PREFIX = "diagnostics/"


def plot_sft_diagnostics(metrics_path: str, out_png: str, title: str = "") -> str | None:
    """Three panels over validation steps; returns the path, or None when the run logged no diagnostics."""
    rows = [r for r in eval_rows(metrics_path) if any(k.startswith(PREFIX) for k in r)]
    if not rows:
        return None
    keys = sorted({k[len(PREFIX):] for r in rows for k in r if k.startswith(PREFIX)})
    steps = [r["step"] for r in rows]

    def series(key):
        return [r.get(PREFIX + key) for r in rows]

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 4))
    for k in keys:
        parts = k.split("/")
        if parts[0] == "reliance" and len(parts) == 3 and parts[2].startswith("accuracy_"):
            ax.plot(steps, series(k), "o-", label=f"{parts[1]} {parts[2][len('accuracy_'):]}")
        elif k == "reliance/multimodal_gain":
            ax.plot(steps, series(k), "k--", lw=2, label="multimodal gain")
        elif parts[0] in ("grad_share", "grad_share_B"):
            bx.plot(steps, series(k), "o-" if parts[0] == "grad_share" else "x:", label=f"{parts[1]} ({parts[0]})")
        elif parts[0] == "attention_share" and parts[-1] == "mean":
            cx.plot(steps, series(k), "o-", label=parts[1])
    for a, label in ((ax, "answer accuracy (teacher forced)"), (bx, "adapter gradient share"),
                     (cx, "attention share of answer positions")):
        a.set_xlabel("step")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(title or "per-modality diagnostics")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
