"""Helpers the benchmark scripts share: mean ± std over seeds and its table formatting."""
from __future__ import annotations

import statistics


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(pair, scale=100.0, digits=1):
    mean, std = pair
    return "-" if mean is None else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
