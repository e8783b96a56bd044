"""`--decoding plain|fmd|plain,fmd` for `mmbalance reliance` and `mmbalance attribute`, and the plain-vs-FMD table."""
from __future__ import annotations

import json
from pathlib import Path

DECODINGS = ("plain", "fmd")


class DecodingArgError(ValueError):
    """A bad --decoding / --fork-layers / --fmd-merge value (the CLIs print it and exit 2)."""


def add_decoding_args(p, allow_both: bool = False) -> None:
    both = " or plain,fmd (both, on the same items, with a comparison table)" if allow_both else ""
    p.add_argument("--decoding", default="plain",
                   help=f"plain, or fmd (Fork-Merge Decoding: audio-only / visual-only first layers, merged){both}")
    p.add_argument("--fork-layers", type=int, default=None,
                   help="FMD: decoder layers run as separate forks (default: a quarter of the layers, at least 1)")
    p.add_argument("--fmd-merge", default="attention",
                   help="FMD merge rule for text tokens: attention (token-wise attention-guided weights), average, "
                        "or a number in [0, 1] (weight on the audio pass)")
    p.add_argument("--fmd-mask", default="attention", choices=("attention", "zero"),
                   help="FMD: hide the other modality from a fork by masking its keys (attention) or by zeroing "
                        "its input embeddings (zero)")


def decodings_from_args(a, allow_both: bool = True) -> tuple[list, dict]:
    """(decodings to run, FMD keyword arguments) from parsed args; raises :class:`DecodingArgError`."""
    decs = [d.strip() for d in str(a.decoding).split(",") if d.strip()]
    bad = [d for d in decs if d not in DECODINGS]
    if not decs or bad or len(set(decs)) != len(decs) or (len(decs) > 1 and not allow_both):
        raise DecodingArgError(f"--decoding: {a.decoding!r} is not one of "
                               + ("plain, fmd, plain,fmd" if allow_both else "plain, fmd"))
    merge = a.fmd_merge
    if merge not in ("attention", "average"):
        try:
            merge = float(merge)
        except ValueError:
            raise DecodingArgError(f"--fmd-merge: {a.fmd_merge!r} is not attention, average or a number") from None
        if not 0.0 <= merge <= 1.0:
            raise DecodingArgError(f"--fmd-merge: {merge} is outside [0, 1]")
    if a.fork_layers is not None and a.fork_layers < 0:
        raise DecodingArgError(f"--fork-layers: {a.fork_layers} is negative")
    return decs, {"fork_layers": a.fork_layers, "merge": merge, "mask": a.fmd_mask}


def comparison_rows(by_decoding: dict) -> list:
    """[(metric, {decoding: value})] for accuracy per condition and needs group, and reliance deltas."""
    first = next(iter(by_decoding.values()))["results"]
    keys = [k for k in first if k.startswith(("acc,", "acc_needs/", "reliance_delta,"))]
    return [(k, {d: ev["results"].get(k) for d, ev in by_decoding.items()}) for k in keys]


def write_decoding_comparison(out_dir, task: str, by_decoding: dict) -> str:
    """``comparison.md`` + ``comparison.json``: one row per metric, one column per decoding, and fmd - plain."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decs = list(by_decoding)
    rows = comparison_rows(by_decoding)
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    diff = "plain" in decs and "fmd" in decs
    head = ["metric"] + decs + (["fmd − plain"] if diff else [])
    lines = [f"**{task}: plain vs Fork-Merge Decoding (same items)**", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, v in rows:
        cells = [k] + [f(v[d]) for d in decs]
        if diff:
            cells.append("–" if None in (v["plain"], v["fmd"]) else f"{v['fmd'] - v['plain']:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    md = out / "comparison.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps({k: v for k, v in rows}, indent=1))
    return str(md)
