"""Small pieces several methods share: performance scores and feature-gradient scaling."""
from __future__ import annotations

import torch


def true_class_scores(unimodal_logits: dict, labels: torch.Tensor) -> torch.Tensor:
    """s_m = sum_i softmax(z_m)_i[y_i] (the OGM-GE score), stacked in modality order, no gradient."""
    with torch.no_grad():
        return torch.stack([
            torch.softmax(z.float(), dim=-1).gather(1, labels[:, None]).sum() for z in unimodal_logits.values()
        ])


def ratio_to_others(scores: torch.Tensor) -> torch.Tensor:
    """rho_m = s_m / mean_{k != m} s_k; for M = 2 this is s_m / s_other."""
    m = len(scores)
    if m == 1:
        return torch.ones_like(scores)
    others = (scores.sum() - scores) / (m - 1)
    return scores / others.clamp_min(1e-12)


def scale_feature_grad(features: dict, coefficients: dict) -> None:
    """Scale the gradient flowing into each modality's features h_m by its coefficient.

    The encoders are disjoint, so this scales exactly encoder m's parameter gradients, under DDP,
    DeepSpeed and FSDP alike, without touching p.grad. Coefficients equal to 1 register nothing,
    so a zero-strength method is bit-identical to the baseline.
    """
    for m, k in coefficients.items():
        k = float(k)
        if k != 1.0 and features[m].requires_grad:
            features[m].register_hook(lambda g, k=k: g * k)
