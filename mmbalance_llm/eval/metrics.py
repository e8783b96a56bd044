"""Balance metrics (README, Metrics): accuracy and macro-F1 from a confusion matrix, exact modality
Shapley values and the imbalance score."""
from __future__ import annotations

import itertools
import math

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds == labels).float().mean()) if len(labels) else 0.0


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as scikit-learn)."""
    cm = confusion_matrix(preds, labels, num_classes).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp_min(1), torch.zeros_like(tp))
    return float(f1[present].mean()) if present.any() else 0.0


def subsets(modalities) -> list:
    """Every subset of the modalities, as frozensets, the empty set included."""
    mods = list(modalities)
    return [frozenset(c) for r in range(len(mods) + 1) for c in itertools.combinations(mods, r)]


def shapley_values(value: dict, modalities) -> dict:
    """phi_m = sum_{S subset of M \\ m} |S|!(M-|S|-1)!/M! [v(S + m) - v(S)], exact over all subsets.

    `value` maps frozenset(S) -> v(S) for every subset (v(empty) measured, not assumed 0). The values
    sum to v(M) - v(empty) (efficiency)."""
    mods = list(modalities)
    n = len(mods)
    phi = {}
    for m in mods:
        others = [k for k in mods if k != m]
        total = 0.0
        for r in range(len(others) + 1):
            w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                s = frozenset(s)
                total += w * (value[s | {m}] - value[s])
        phi[m] = total
    return phi


def imbalance(phi: dict) -> float:
    """Imb = sum_{i<j} |phi_i - phi_j| / ((M - 1) * sum_m |phi_m|); 0 is balanced, 1 means one modality
    carries everything. For M = 2: |phi_1 - phi_2| / (|phi_1| + |phi_2|). The project's definition
    (the reference toolkit only logs phi)."""
    vals = list(phi.values())
    n = len(vals)
    denom = (n - 1) * sum(abs(v) for v in vals)
    if n < 2 or denom == 0:
        return 0.0
    return sum(abs(a - b) for a, b in itertools.combinations(vals, 2)) / denom


def accuracy_ratio(unimodal_accuracy: dict) -> dict:
    """acc_m / max_k acc_k per modality."""
    top = max(unimodal_accuracy.values(), default=0.0)
    return {m: (a / top if top > 0 else 0.0) for m, a in unimodal_accuracy.items()}
