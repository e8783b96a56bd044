"""`cml`: Calibrating Multimodal Learning.

Ma et al., "Calibrating Multimodal Learning", ICML 2023. Stage: objective.

A model should not be more confident with fewer modalities. Once per epoch the modality order is shuffled
(one seeded permutation, identical on every rank). Starting from the full logits z, modalities are removed
one at a time along that order: z' = z - z_m + b/M, i.e. the removed modality's split-head logits are
subtracted while the full bias b is kept (METHODS.md §1), giving a chain z = z^(0), z^(1), ..., z^(M-1).
With conf = max softmax probability:

    L = [CE(z) + sum_k CE(z^(k))] / M + lambda * sum_k max(0, sum_i conf^(k)_i - conf^(k-1)_i)

(the confidence of each reduced input is compared with that of the input it was obtained from; the
hinge is on the batch sum, as in the reference implementation).

Defaults: lambda = 0.1 (reference toolkit), regularisation from epoch 0 on. Outside the modulation window
the loss is CE(z).

M > 2: supported (M - 1 removals along the shuffled order; BB hard-codes M in {2, 3}).

Deviations from the reference toolkit: none in the loss; the per-epoch shuffle uses a generator seeded
with (seed, epoch), so all ranks and resumed runs remove modalities in the same order (BB uses the global
`random` state).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class CMLConfig(BalancerConfig):
    lam: float = hp(0.1, "Weight lambda of the confidence-ranking hinge.")
    modulation_starts: int = hp(0, "First epoch (0-based) with the CML loss.")
    modulation_ends: int = hp(1_000_000, "Last epoch (0-based, inclusive) with the CML loss.")


def removal_chain(z: torch.Tensor, unimodal: dict, order: list, bias: torch.Tensor) -> list:
    """[z^(1), ..., z^(M-1)]: remove order[0], then order[1], ... keeping the full bias."""
    m = len(unimodal)
    chain, cur = [], z
    for name in order[: m - 1]:
        cur = cur - unimodal[name] + bias / m
        chain.append(cur)
    return chain


def cml_loss(z, unimodal, order, bias, labels, lam):
    chain = removal_chain(z, unimodal, order, bias)
    ce = (F.cross_entropy(z, labels) + sum(F.cross_entropy(c, labels) for c in chain)) / len(unimodal)
    hinge = z.new_zeros(())
    prev = torch.softmax(z, dim=-1).max(dim=-1).values
    for c in chain:
        conf = torch.softmax(c, dim=-1).max(dim=-1).values
        hinge = hinge + torch.clamp((conf - prev).sum(), min=0)
        prev = conf
    return ce + lam * hinge, ce, hinge


@register
class CML(Balancer):
    name = "cml"
    stage = "objective"
    paper = "Ma et al., Calibrating Multimodal Learning, ICML 2023"
    requires_unimodal_logits = True
    config_class = CMLConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.order = None

    def setup(self, ctx, model):
        super().setup(ctx, model)
        fusion = getattr(ctx.unwrap(model), "fusion", None)
        if getattr(fusion, "classifier", None) is None or getattr(fusion.classifier, "bias", None) is None:
            raise ValueError("balance.method 'cml' needs a linear fusion head with a bias (model.fusion: concat or sum)")

    def on_epoch_start(self, model, epoch):
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.ctx.modalities), generator=gen).tolist()
        self.order = [self.ctx.modalities[i] for i in perm]

    def loss(self, model, batch, outputs):
        c = self.config
        if not (c.modulation_starts <= self.ctx.epoch <= c.modulation_ends):
            return super().loss(model, batch, outputs)
        if self.order is None:
            self.on_epoch_start(model, self.ctx.epoch)
        bias = self.ctx.unwrap(model).fusion.classifier.bias
        total, ce, hinge = cml_loss(outputs.logits, outputs.unimodal_logits, self.order, bias, batch["labels"], c.lam)
        return total, {"cml_ce": ce.item(), "cml_hinge": hinge.item()}
