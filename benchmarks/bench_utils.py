"""Helpers the benchmark scripts share: mean ± std over seeds and its table formatting."""
from __future__ import annotations

import statistics


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(pair, scale=100.0, digits=1):
    """`mean ± std`; the mean alone for one seed (no spread to show)."""
    mean, std = pair
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f}" if std is None else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def write_result(out: str, md: str, rows) -> None:
    """Write a benchmark's table (`out`.md) and its numbers (`out`.json), and print the table."""
    import json
    import os

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".md", "w") as fh:
        fh.write(md + "\n")
    with open(out + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)
    print(md)
