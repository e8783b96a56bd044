"""`evaluate` metric modules shipped with the toolkit (the hub is not reachable; load them by path).

    import evaluate
    from mmbalance_llm.metrics import metric_path
    m = evaluate.load(metric_path("modality_reliance"))

Modules: ``modality_reliance`` (accuracy per condition, reliance delta/ratio, MMStar MG/ML),
``modality_imbalance`` (per-modality mean contribution, share, imbalance score), ``pope`` (precision, recall,
F1, yes-ratio) and ``mme`` (acc, acc+, score per category). Each is numpy-only.
"""
from __future__ import annotations

from pathlib import Path

METRICS = ("modality_reliance", "modality_imbalance", "pope", "mme")


def metric_path(name: str) -> str:
    """Absolute path of a shipped metric script, for ``evaluate.load``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {', '.join(METRICS)}")
    return str(Path(__file__).parent / name / f"{name}.py")
