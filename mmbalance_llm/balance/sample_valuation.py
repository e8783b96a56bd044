"""`sample_valuation`: sample-level modality valuation and targeted re-sampling.

Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality Valuation", CVPR 2024.
Stage: data.
Follows: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@7ed12b07ee7d233aa835089185c909aaa3ff6b1e:
code/sample_level.py (thresholds, warm-up; the paper's CREMA-D setting).

At the start of every epoch from `warmup_epochs` on, each training sample i gets a Shapley value per
modality, phi_i^m, with utility v(S) = 1[prediction with only S kept is correct], v(empty) measured with
all inputs zeroed (balance/_valuation.py; a modality that never changes the outcome scores 0). Every modality m of sample i
then gets extra copies of i that keep only m (others zeroed), the more the lower its contribution score
c = phi_i^m + v_i(full) / M (the original code's scale, exact for M = 2): 1 copy if low1 < c < high, 2 if
low2 < c <= low1, 3 if c <= low2 (defaults 1 / 0.4 / -0.1, the official code's `0.4 < c < 1`,
`-0.1 < c < 0.4`, `c < -0.1` in code/datasets/dataloader.py; the scores lie on a lattice of 1/(2M) steps, so
the closed ends never matter for M = 2). The copies
are added to that epoch's data.

Defaults: warmup_epochs = 5 (the original script's warm-up; valuation first runs before epoch 5).
M > 2: yes (exact Shapley over all 2^M coalitions, thresholds per modality).

Distributed: every rank values its shard of the ordered training data; the table is gathered so all ranks
build the same copy list, and the sampler shards whole batches so each copy lands on one rank once.
1 vs 2 processes: the re-sampled epoch is cut into *global* batches first (balance/_valuation.py,
`ResampleBatchSampler`), which are then split between the ranks, so at the same global batch both runs see
the same samples per step; a global batch of odd size splits into pieces that differ by one sample, so the
loss is the summed CE scaled by W / (global batch size) (`ResamplingState.loss`), whose DDP average is the
1-process mean. Measured: max |parameter difference| after 2 epochs, 1 process at batch 32 vs 2 at 16,
is float rounding (see docs/datastage.md).

Differences from the reference code, on purpose: BB's per-sample Shapley routine reads a misspelled
attribute and crashes. The original assumes v(empty) = 0, which credits a signal-free modality whenever the blank
prediction is right; here v(empty) is measured. The original computes contributions with a dropped *feature*; here inputs are zeroed, the same
operation the copies and the evaluator's Shapley metric use. The valuation runs on `train_eval` (ordered,
no augmentation), never on validation or test. The learning-rate schedule still counts the un-resampled
epoch length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmbalance_llm.balance import register
from mmbalance_llm.balance._valuation import (ResamplingState, resampling_score, sample_shapley)
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class SampleValuationConfig(BalancerConfig):
    warmup_epochs: int = hp(5, "Epochs of plain training before the first valuation (0-based epoch of the first re-sampling).", min=0)
    high: float = hp(1.0, "Score at or above this: no extra copy (official 1).")
    low1: float = hp(0.4, "low1 < score < high: 1 copy; low2 < score <= low1: 2 copies.")
    low2: float = hp(-0.1, "Score <= low2: 3 copies.")


def copies_for(score: torch.Tensor, modalities, high: float, low1: float, low2: float) -> list:
    """[(sample index, (modality,)), ...] single-modality copies from a score table [N, M] (NaN rows skipped)."""
    counts = torch.zeros_like(score, dtype=torch.long)
    counts[(score > low1) & (score < high)] = 1
    counts[(score > low2) & (score <= low1)] = 2
    counts[score <= low2] = 3
    out = []
    for i, j in torch.nonzero(counts).tolist():
        out += [(i, (modalities[j],))] * int(counts[i, j])
    return out


@register
class SampleValuation(ResamplingState, Balancer):
    name = "sample_valuation"
    stage = "data"
    paper = "Wei et al., CVPR 2024 (sample-level modality valuation)"
    config_class = SampleValuationConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not c.low2 < c.low1 < c.high:
            raise ValueError(f"balance thresholds must satisfy low2 < low1 < high, got {c.low2}, {c.low1}, {c.high}")
        if c.warmup_epochs < 0:
            raise ValueError(f"balance.warmup_epochs must be >= 0, got {c.warmup_epochs}")
        self.copies: list = []
        self.stats: dict = {}

    def on_epoch_start(self, model, epoch):
        self.copies = []
        if epoch < self.config.warmup_epochs:
            return
        ctx = self.ctx
        data = ctx.train_dataset
        phi, full = sample_shapley(model, ctx.loaders["train_eval"], ctx.accelerator, ctx.modalities, len(data))
        c = self.config
        self.copies = copies_for(resampling_score(phi, full), ctx.modalities, c.high, c.low1, c.low2)
        mean = torch.nanmean(phi, dim=0)
        self.stats = {f"phi_{m}": float(v) for m, v in zip(ctx.modalities, mean)}
        self.stats["resampled"] = len(self.copies)
        ctx.log({"step": ctx.global_step, "epoch": epoch + 1, "split": "valuation", **self.stats})
