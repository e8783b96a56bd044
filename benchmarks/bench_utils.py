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
