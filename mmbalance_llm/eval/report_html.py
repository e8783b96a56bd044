"""Attribution report: a self-contained HTML page (token heatmaps with modality spans, per-layer attention
share, per-sample and dataset summaries) plus the PNG plots it embeds.

Input is the summary dict that ``mmbalance attribute`` writes as JSON (see ``attribution/cli.py``):
``{"model", "data", "methods": {method: {"mean_share", "std_share", "target", "baseline", ...}},
"attention_per_layer": {modality: [L]}, "samples": [{"id", "tokens", "token_modality", "modalities",
"scores": {method: [T]}, "share": {method: {modality: float}}}]}``.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

MOD_COLOURS = {"text": "#4C72B0", "image": "#DD8452", "video": "#8172B3", "audio": "#55A868"}
_FALLBACK = ["#C44E52", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def modality_colour(m: str, i: int = 0) -> str:
    return MOD_COLOURS.get(m, _FALLBACK[i % len(_FALLBACK)])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_shares(summary: dict, path) -> str:
    """Grouped bars: mean modality share (± std over samples) per method."""
    plt = _plt()
    methods = list(summary["methods"])
    mods = summary["modalities"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(methods), 3.2))
    w = 0.8 / max(1, len(mods))
    for i, m in enumerate(mods):
        xs = [k + (i - (len(mods) - 1) / 2) * w for k in range(len(methods))]
        ys = [summary["methods"][me]["mean_share"].get(m, 0.0) for me in methods]
        es = [summary["methods"][me]["std_share"].get(m, 0.0) for me in methods]
        ax.bar(xs, ys, w, yerr=es, label=m, color=modality_colour(m, i), capsize=2)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("modality share")
    ax.legend(fontsize=8)
    ax.set_title("Modality share per attribution method (mean ± std over samples)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_attention_layers(per_layer: dict, path, title: str = "Attention share per layer") -> str:
    """Lines: head-mean attention share of each modality per layer (sink key excluded)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for i, (m, vals) in enumerate(per_layer.items()):
        ax.plot(range(len(vals)), vals, marker="o", label=m, color=modality_colour(m, i))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the query's attention")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_token_heatmap(sample: dict, method: str, path, max_tokens: int = 96) -> str:
    """One sample's per-token |score| as a strip, with a modality band underneath."""
    plt = _plt()
    import numpy as np

    scores = np.abs(np.asarray(sample["scores"][method], dtype=float))
    tm = np.asarray(sample["token_modality"])
    keep = np.nonzero(tm >= 0)[0][:max_tokens]
    s, t = scores[keep], tm[keep]
    s = s / s.max() if s.size and s.max() > 0 else s
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(min(14, 1 + 0.14 * len(keep)), 1.9), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    a1.imshow(s[None, :], aspect="auto", cmap="magma_r", vmin=0, vmax=1)
    a1.set_yticks([])
    a1.set_title(f"{sample.get('id', '')}: |{method}| per prompt token", fontsize=9)
    from matplotlib.colors import ListedColormap

    mods = sample["modalities"]
    cmap = ListedColormap([modality_colour(m, i) for i, m in enumerate(mods)])
    a2.imshow(t[None, :], aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(mods) - 0.5)
    a2.set_yticks([])
    a2.set_xlabel("prompt position (band: " + ", ".join(f"{m}" for m in mods) + ")", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _img(path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _token_html(sample: dict, method: str) -> str:
    """Tokens as spans shaded by |score| (per-sample max = 1); media runs boxed and labelled."""
    scores = [abs(float(x)) for x in sample["scores"][method]]
    tm = sample["token_modality"]
    toks = sample["tokens"]
    mods = sample["modalities"]
    top = max((s for s, m in zip(scores, tm) if m >= 0), default=0.0) or 1.0
    out, k = [], 0
    while k < len(toks):
        m = tm[k]
        if m < 0:
            k += 1
            continue
        j = k
        while j < len(toks) and tm[j] == m:
            j += 1
        name = mods[m]
        cells = "".join(
            f'<span class="t" style="background:rgba(200,30,30,{scores[i] / top:.3f})" '
            f'title="{html.escape(str(toks[i]))}: {scores[i]:.4g}">{html.escape(str(toks[i])) if name == "text" else "▪"}</span>'
            for i in range(k, j))
        out.append(f'<span class="span" style="border-color:{modality_colour(name, m)}">'
                   f'<span class="lab" style="color:{modality_colour(name, m)}">{html.escape(name)}'
                   f'{"" if name == "text" else f" ×{j - k}"}</span>{cells}</span>')
        k = j
    return "".join(out)


_DETAIL_LABELS = {
    "shapley_phi_mean": "mean modality Shapley value φ (token Shapley)",
    "delta_logp_blank_mean": "mean Δ log p of the answer when the modality is blanked",
}


def _cell(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    return f"{value:.4g}"


def details_table(extras: dict) -> str:
    """Method extras as a table: one row per entry, one column per key of the nested dicts (usually the
    modalities); entries that are not dicts get a single value column."""
    columns = []
    for v in extras.values():
        for k in (v if isinstance(v, dict) else {}):
            if k not in columns:
                columns.append(k)
    flat = any(not isinstance(v, dict) for v in extras.values())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + ("<th>value</th>" if flat else "")
    rows = [f"<table><tr><th>quantity</th>{head}</tr>"]
    for key, v in extras.items():
        label = html.escape(_DETAIL_LABELS.get(key, str(key)))
        if isinstance(v, dict):
            cells = "".join(f"<td>{_cell(v[c]) if c in v else ''}</td>" for c in columns) + ("<td></td>" if flat else "")
        else:
            cells = "<td></td>" * len(columns) + f"<td>{_cell(v)}</td>"
        rows.append(f"<tr><td title='{html.escape(str(key))}'>{label}</td>{cells}</tr>")
    rows.append("</table>")
    return "".join(rows)


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left} .span{display:inline-block;border:2px solid;border-radius:4px;
margin:2px;padding:1px 2px} .lab{font-size:10px;font-weight:bold;margin-right:3px} .t{font-family:monospace;
font-size:12px;padding:0 1px} .note{color:#555;font-size:13px} img{max-width:100%}"""


def render_report(summary: dict, out_dir, heatmap_method: str | None = None, max_samples: int = 8) -> dict:
    """Write ``report.html`` and its PNGs under ``out_dir``; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"shares_png": plot_shares(summary, out / "modality_shares.png")}
    if summary.get("attention_per_layer"):
        paths["attention_png"] = plot_attention_layers(summary["attention_per_layer"], out / "attention_layers.png")
    methods = list(summary["methods"])
    hm = heatmap_method or next((m for m in ("grad_x_input", "integrated_gradients", "shapley_tokens") if m in methods),
                                methods[0])
    samples = summary["samples"][:max_samples]
    if samples:
        paths["heatmap_png"] = plot_token_heatmap(samples[0], hm, out / "token_heatmap.png")
    mods = summary["modalities"]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>Modality attribution</title><style>{_CSS}</style>"
         "</head><body>", "<h1>Modality attribution report</h1>",
         f"<p class='note'>model: {html.escape(str(summary.get('model')))}<br>data: "
         f"{html.escape(str(summary.get('data')))}<br>samples: {summary.get('n_samples')}</p>",
         "<h2>Dataset summary</h2><table><tr><th>method</th>"
         + "".join(f"<th>{html.escape(m)} share</th>" for m in mods) + "<th>target</th><th>baseline</th></tr>"]
    for me, d in summary["methods"].items():
        h.append(f"<tr><td>{me}</td>" + "".join(
            f"<td>{d['mean_share'].get(m, 0):.3f} ± {d['std_share'].get(m, 0):.3f}</td>" for m in mods)
            + f"<td style='text-align:left'>{html.escape(d['target'])}</td>"
              f"<td style='text-align:left'>{html.escape(d['baseline'])}</td></tr>")
    h.append("</table>")
    for key, ttl in (("shares_png", "Shares per method"), ("attention_png", "Per-layer attention share")):
        if key in paths:
            h.append(f"<h3>{ttl}</h3>{_img(paths[key])}")
    if summary.get("extras"):
        h.append("<h3>Details</h3>" + details_table(summary["extras"]))
    h.append(f"<h2>Per sample (heatmap: |{hm}|, darker = larger)</h2>")
    for s in samples:
        h.append(f"<h3>{html.escape(str(s.get('id')))}</h3>")
        if s.get("answer") is not None:
            h.append(f"<p class='note'>target answer: {html.escape(str(s['answer']))}</p>")
        h.append(f"<div>{_token_html(s, hm)}</div><table><tr><th>method</th>"
                 + "".join(f"<th>{html.escape(m)}</th>" for m in s["modalities"]) + "</tr>")
        for me, sh in s["share"].items():
            h.append(f"<tr><td>{me}</td>" + "".join(f"<td>{sh.get(m, 0):.3f}</td>" for m in s["modalities"]) + "</tr>")
        h.append("</table>")
    h.append("</body></html>")
    paths["html"] = str(out / "report.html")
    Path(paths["html"]).write_text("\n".join(h), encoding="utf-8")
    return paths
