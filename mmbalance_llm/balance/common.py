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
            _scale_grad(features[m], k)


# DeepSpeed ZeRO-3 hands every module output back through an identity autograd Function (to fetch the
# module's parameters before its backward): the features a model returns are then a new node *after* the
# tensor its fusion consumed, and a hook on them sees only the gradient of losses that read them directly
# (measured: AGM's coefficients never reached the encoders under ZeRO-3).
_ZERO3_WRAPPERS = ("PreBackwardFunctionForModuleBackward", "PostBackwardFunctionModuleBackward")


def _scale_grad(tensor: torch.Tensor, k: float) -> None:
    node = tensor.grad_fn
    if node is None or type(node).__name__ not in _ZERO3_WRAPPERS:
        tensor.register_hook(lambda g: g * k)
        return
    index = 0
    while node is not None and type(node).__name__ in _ZERO3_WRAPPERS:
        node, index = node.next_functions[0]
    # the node that made the tensor every consumer reads: scale the gradient arriving at that output
    node.register_prehook(lambda grads: tuple(g * k if i == index and g is not None else g
                                              for i, g in enumerate(grads)))
