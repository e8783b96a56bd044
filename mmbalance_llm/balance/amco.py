"""`amco`: Adaptive Mask Co-optimization.

Zhou, Liang, Zheng, Xuan, Kumada, "Adaptive Mask Co-optimization for Modal Dependence in Multimodal
Learning", ICASSP 2023 (AMCo). Stage: feed-forward.
Follows: the paper (no official code) and GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3:
balancemm/trainer/AMCo_trainer.py and balancemm/models/avclassify_model.py (`unimodality_calculate`).

The fused logits are the sum of the split-head unimodal logits, z = sum_m z_m. During training a
modality the sample depends on is made harder to use: sample i depends on m when m's share of the
softmax mass over the concatenated [z_1; ...; z_M] exceeds sigma; the fused output then uses
z_m * mask_m, where mask_m zeroes floor(p_t * C) randomly chosen class logits. The mask ratio follows the
paper's schedule p_t = sin(pi/2 * min(epsilon, l_t) / epsilon) with l_t the fraction of training done, so it
rises from 0 to 1 over the first `epsilon` of training. Co-optimization: L = CE(z_masked, y) + sum_m CE(z'_m, y)
with z'_m the dependent modality's *masked* split logits (`unimodal_ce: masked`, BalanceBenchmark, whose
unimodal results are the masked logits), or the unmasked split logits (`unimodal_ce: unmasked`, which keeps
a gradient into every class logit of the dependent modality even at full masking). Evaluation is unmasked.

Defaults: sigma = 0.5, epsilon = 0.3 (BB and the paper).
M > 2: yes (the share is over all M blocks; with sigma = 0.5 at most one modality is dependent per sample).

Differences from BalanceBenchmark, on purpose: BB advances l_t by epoch/10 per batch, so p_t = 1 (every
logit of the dependent modality zeroed) from the second epoch on; here l_t is the training progress as
in the paper. BB expands the mask to a first dimension of 2, which only broadcasts under 2-GPU
DataParallel; here masks are per sample for any batch size. BB flags dependence once per step from the
batch and applies it on the next step; here it is decided per sample from the current (unmasked, no-grad)
logits. BB's extra linear layer after the masked sum is left out, so the model and its checkpoints stay
the plain classifier. The masking is a forward hook on the fusion head installed only for the training
forward; masks are drawn from a generator seeded by (seed, step, rank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs


@dataclass
class AMCoConfig(BalancerConfig):
    sigma: float = hp(0.5, "A modality is dependent for a sample when its softmax share over [z_1..z_M] exceeds sigma.")
    epsilon: float = hp(0.3, "Fraction of training over which the mask ratio rises from 0 to 1.")
    unimodal_ce: str = hp("masked", "Unimodal cross-entropies on the dependent modality's 'masked' logits "
                                    "(BalanceBenchmark) or on the 'unmasked' split logits.")


def mask_ratio(progress: float, epsilon: float) -> float:
    """p_t = sin(pi/2 * min(epsilon, l_t) / epsilon)."""
    return math.sin(math.pi / 2 * min(epsilon, max(0.0, progress)) / epsilon)


def dependent_modalities(unimodal: dict, sigma: float) -> torch.Tensor:
    """[B, M] bool: m's share of the softmax over the concatenated unimodal logits exceeds sigma."""
    stacked = torch.stack([z.detach().float() for z in unimodal.values()], dim=1)  # [B, M, C]
    probs = torch.softmax(stacked.flatten(1), dim=-1).view_as(stacked)
    return probs.sum(-1) > sigma


def class_masks(dependent: torch.Tensor, num_classes: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """[B, M, C] float masks: for dependent (i, m), floor(ratio * C) random classes are zeroed."""
    b, m = dependent.shape
    k = int(math.floor(ratio * num_classes))
    masks = torch.ones(b, m, num_classes)
    if k == 0 or not dependent.any():
        return masks
    ranks = torch.rand(b, m, num_classes, generator=gen).argsort(-1).argsort(-1)  # a random permutation rank
    masked = (ranks < k) & dependent.unsqueeze(-1)
    masks[masked] = 0.0
    return masks


@register
class AMCo(Balancer):
    name = "amco"
    stage = "feed-forward"
    paper = "Zhou et al., ICASSP 2023 (adaptive mask co-optimization, AMCo)"
    requires_unimodal_logits = True
    config_class = AMCoConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not 0 < c.epsilon <= 1:
            raise ValueError(f"balance.epsilon must be in (0, 1], got {c.epsilon}")
        if c.unimodal_ce not in ("masked", "unmasked"):
            raise ValueError(f"balance.unimodal_ce must be 'masked' or 'unmasked', got {c.unimodal_ce!r}")
        if not 0 < c.sigma < 1:
            raise ValueError(f"balance.sigma must be in (0, 1), got {c.sigma}")
        self._stats = {}

    def progress(self) -> float:
        total = max(1, self.ctx.total_steps)
        return self.ctx.global_step / total

    def _mask_output(self, output):
        fused, unimodal = output
        ctx = self.ctx
        dep = dependent_modalities(unimodal, self.config.sigma)
        ratio = mask_ratio(self.progress(), self.config.epsilon)
        gen = torch.Generator().manual_seed((ctx.seed * 1_000_003 + ctx.global_step) * 64 + ctx.accelerator.process_index)
        masks = class_masks(dep.cpu(), fused.shape[-1], ratio, gen).to(fused.device, fused.dtype)
        masked_uni = {m: z * masks[:, j] for j, (m, z) in enumerate(unimodal.items())}
        masked = sum(masked_uni.values())
        self._stats = {"amco_mask_ratio": ratio, **{f"amco_dependent_{m}": float(dep[:, j].float().mean())
                                                    for j, m in enumerate(unimodal)}}
        return masked, (masked_uni if self.config.unimodal_ce == "masked" else unimodal)

    def forward(self, model, batch):
        fusion = self.ctx.unwrap(model).fusion
        handle = fusion.register_forward_hook(lambda mod, args, out: self._mask_output(out))
        try:
            return model(**model_inputs(batch, self.ctx.modalities))
        finally:
            handle.remove()

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        fused = F.cross_entropy(outputs.logits, labels)
        uni = {m: F.cross_entropy(z, labels) for m, z in outputs.unimodal_logits.items()}
        logs = {**self._stats, **{f"loss_{m}": v.item() for m, v in uni.items()}}
        return fused + sum(uni.values()), logs
