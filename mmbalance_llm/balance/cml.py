"""`cml`: Calibrating Multimodal Learning.

Ma et al., "Calibrating Multimodal Learning", ICML 2023. Stage: objective.
Follows: GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3:balancemm/trainer/CML_trainer.py
(`training_step`); the paper's own repository was not compared.

A model should not be more confident with fewer modalities. Once per epoch the modality order is shuffled
(one seeded permutation, identical on every rank). Starting from the full logits z, modalities are removed
one at a time along that order: z' = z - z_m + b/M, i.e. the removed modality's split-head logits are
subtracted while the full bias b is kept, giving a chain z = z^(0), z^(1), ..., z^(M-1).
With conf = max softmax probability:

    L = [CE(z) + sum_k CE(z^(k))] / M + lambda * sum_k max(0, sum_i conf^(k)_i - conf^(k-1)_i)

(the confidence of each reduced input is compared with that of the input it was obtained from; the
hinge is on the batch sum, as in the reference implementation).

1 vs 2 processes: the hinge is on the sum over the *global* batch: each rank's batch sum is summed over
processes before the max(0, .), and the rank's term is scaled by the number of processes so that DDP's
gradient average gives the gradient of the global hinge. At the same global batch (equal shard sizes) the
run equals the 1-process run.

Defaults: lambda = 0.1 (reference toolkit), regularisation from epoch 0 on. Outside the modulation window
the loss is CE(z).

M > 2: supported (M - 1 removals along the shuffled order; BB hard-codes M in {2, 3}).

Differences from the reference toolkit: none in the loss; the per-epoch shuffle uses a generator seeded
with (seed, epoch), so all ranks and resumed runs remove modalities in the same order (BB uses the global
`random` state); BB's hinge is per process (its DataParallel batch is the global batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class CMLConfig(BalancerConfig):
    lam: float = hp(0.1, "Weight lambda of the confidence-ranking hinge.", min=0.0)
    modulation_starts: int = hp(0, "First epoch (0-based) with the CML loss.", min=0)
    modulation_ends: int = hp(1_000_000, "Last epoch (0-based, inclusive) with the CML loss.", min=0)


def removal_chain(z: torch.Tensor, unimodal: dict, order: list, bias: torch.Tensor) -> list:
    """[z^(1), ..., z^(M-1)]: remove order[0], then order[1], ... keeping the full bias."""
    m = len(unimodal)
    chain, cur = [], z
    for name in order[: m - 1]:
        cur = cur - unimodal[name] + bias / m
        chain.append(cur)
    return chain


def global_hinge(local_sum: torch.Tensor, ctx=None) -> torch.Tensor:
    """max(0, S) with S the batch sum over every process; its gradient after DDP's average is that of the
    1-process hinge on the global batch. Without a context (or with one process) it is plain max(0, s)."""
    if ctx is None or ctx.accelerator.num_processes == 1:
        return torch.clamp(local_sum, min=0)
    world = ctx.accelerator.num_processes
    total = ctx.reduce_sum(local_sum.detach().reshape(1))[0]
    if float(total) <= 0:
        return local_sum * 0
    scaled = world * local_sum
    return scaled - scaled.detach() + total


def cml_loss(z, unimodal, order, bias, labels, lam, ctx=None):
    chain = removal_chain(z, unimodal, order, bias)
    ce = (F.cross_entropy(z, labels) + sum(F.cross_entropy(c, labels) for c in chain)) / len(unimodal)
    hinge = z.new_zeros(())
    prev = torch.softmax(z, dim=-1).max(dim=-1).values
    for c in chain:
        conf = torch.softmax(c, dim=-1).max(dim=-1).values
        hinge = hinge + global_hinge((conf - prev).sum(), ctx)
        prev = conf
    return ce + lam * hinge, ce, hinge


@register
class CML(Balancer):
    name = "cml"
    stage = "objective"
    paper = "Ma et al., Calibrating Multimodal Learning, ICML 2023"
    requires_unimodal_logits = True
    config_class = CMLConfig
    zero_stages = (0, 1, 2)
    zero_stages_reason = "its removal chain reads the fusion head's bias, which ZeRO-3 partitions"

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
        total, ce, hinge = cml_loss(outputs.logits, outputs.unimodal_logits, self.order, bias, batch["labels"], c.lam,
                                     self.ctx)
        return total, {"cml_ce": ce.item(), "cml_hinge": hinge.item()}
