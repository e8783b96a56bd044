"""`unimodal_aux`: fused cross-entropy plus a cross-entropy on every modality's split-head logits.

Stage: objective. L = CE(z, y) + weight * sum_m CE(z_m, y), where z_m is the concat (or sum) head split
by columns (z_m = W[:, S_m] h_m + b / M), so no extra parameters are added. This is what the reference toolkit's
MMPareto reduces to in practice (its per-loss gradients are never separated) and a strong, cheap baseline on its own.
Handles any M. weight = 0 reproduces the baseline exactly.
Follows: paper only (the standard auxiliary unimodal loss, e.g. the "uni-modal loss" baseline of
MMPareto, ICML 2024); no official code. Differences: none (no extra heads, the split head is used).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class UnimodalAuxConfig(BalancerConfig):
    weight: float = hp(1.0, "Weight of the summed unimodal cross-entropies.", min=0.0)


@register
class UnimodalAux(Balancer):
    name = "unimodal_aux"
    stage = "objective"
    paper = "Fused + split-head unimodal cross-entropy (the effective form of BalanceBenchmark's MMPareto)."
    requires_unimodal_logits = True
    config_class = UnimodalAuxConfig

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        fused = F.cross_entropy(outputs.logits, labels)
        if self.config.weight == 0:
            return fused, {}
        uni = {m: F.cross_entropy(z, labels) for m, z in outputs.unimodal_logits.items()}
        logs = {f"loss_{m}": v.item() for m, v in uni.items()}
        return fused + self.config.weight * sum(uni.values()), logs
