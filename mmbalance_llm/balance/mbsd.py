"""`mbsd`: modality-balanced self-distillation between the unimodal branches.

Method as specified by the reference toolkit (BalanceBenchmark's MBSD trainer, "Liu et al. 2023").
Stage: objective.
Follows: GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3:balancemm/trainer/MBSD_trainer.py
(`training_step`); no official code of the paper exists.

Per sample i and pair of modalities (a, b) with split-head logits z_a, z_b and p = softmax(z):
- w_i = |p_a(y_i) - p_b(y_i)| if either unimodal prediction is correct, else 0;
- the stronger branch of the pair for sample i is the one with the higher true-class probability.

    L = CE(z) + sum_m CE(z_m) + mean_pairs [ mean_i w_i (1/C) |z_a - z_b|^2
                                            + mean_i w_i KL(p_strong || p_weak) ]

The KL is a true KL divergence between the two predictive distributions, with the strong side detached
(it is the teacher). `weight` scales both distillation terms. The pair weight w carries gradient, as in
BalanceBenchmark (it writes the differentiable |p_a - p_b| into its weight tensor); `detach_weight: true`
treats it as a constant.

Defaults: weight = 1, detach_weight = false, distillation from epoch 0 on (outside the window the loss is CE(z)).

M > 2: supported, averaging the pair terms over all pairs (BB averages over the 3 pairs for M = 3).

Differences from BalanceBenchmark, on purpose:
- BB calls `F.kl_div` on the scalar true-class probabilities (probabilities where log-probabilities are
  expected), which is not a KL divergence; here it is KL(p_strong || p_weak) over the classes;
- BB switches from the logit MSE to a probability MSE for M = 3; here the logit MSE is used for every M;
- BB loops over samples in Python; this is vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class MBSDConfig(BalancerConfig):
    weight: float = hp(1.0, "Weight of the two distillation terms (logit MSE and KL). 0 leaves fused + unimodal CE.", min=0.0)
    detach_weight: bool = hp(False, "Treat the pair weight w = |p_a(y) - p_b(y)| as a constant (BalanceBenchmark lets it carry gradient).")
    modulation_starts: int = hp(0, "First epoch (0-based) with the MBSD loss.", min=0)
    modulation_ends: int = hp(1_000_000, "Last epoch (0-based, inclusive) with the MBSD loss.", min=0)


def pair_terms(za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor,
               detach_weight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted logit-MSE term, weighted KL term) of one modality pair, each a batch mean."""
    pa, pb = torch.softmax(za, -1), torch.softmax(zb, -1)
    ya, yb = pa.gather(1, labels[:, None])[:, 0], pb.gather(1, labels[:, None])[:, 0]
    with torch.no_grad():
        correct = (pa.argmax(-1) == labels) | (pb.argmax(-1) == labels)
        a_strong = ya >= yb
    w = torch.where(correct, (ya - yb).abs(), torch.zeros_like(ya))
    if detach_weight:
        w = w.detach()
    rs = ((za - zb) ** 2).sum(-1) / za.shape[-1]
    log_pa, log_pb = torch.log_softmax(za, -1), torch.log_softmax(zb, -1)
    strong_log = torch.where(a_strong[:, None], log_pa, log_pb).detach()
    weak_log = torch.where(a_strong[:, None], log_pb, log_pa)
    kl = (strong_log.exp() * (strong_log - weak_log)).sum(-1)
    return (w * rs).mean(), (w * kl).mean()


@register
class MBSD(Balancer):
    name = "mbsd"
    stage = "objective"
    paper = "Modality-balanced self-distillation (Liu et al. 2023, as in BalanceBenchmark)"
    requires_unimodal_logits = True
    config_class = MBSDConfig

    def loss(self, model, batch, outputs):
        c = self.config
        if not (c.modulation_starts <= self.ctx.epoch <= c.modulation_ends):
            return super().loss(model, batch, outputs)
        labels, uni = batch["labels"], outputs.unimodal_logits
        ce = F.cross_entropy(outputs.logits, labels) + sum(F.cross_entropy(z, labels) for z in uni.values())
        if c.weight == 0 or len(uni) < 2:
            return ce, {}
        pairs = list(combinations(list(uni), 2))
        terms = [pair_terms(uni[a], uni[b], labels, c.detach_weight) for a, b in pairs]
        rs = sum(t[0] for t in terms) / len(pairs)
        kl = sum(t[1] for t in terms) / len(pairs)
        return ce + c.weight * (rs + kl), {"mbsd_rs": rs.item(), "mbsd_kl": kl.item()}
