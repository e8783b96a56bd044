"""`modality_valuation`: modality-level (dataset-level) valuation and re-sampling.

Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality Valuation", CVPR 2024
(the cheaper modality-level variant of the paper; BalanceBenchmark's default valuation method). Stage: data.
Follows: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@7ed12b07ee7d233aa835089185c909aaa3ff6b1e:
code/modality_level.py (the paper's CREMA-D setting).

At the start of every epoch from `warmup_epochs` on: draw a random part Z (`part_ratio` of the training
set), compute each sample's modality Shapley values there (utility |S| * 1[correct], balance/_valuation.py),
average them to phi_m, and set gap_m = 1 - phi_m. The discrepancy D = (2/3) * alpha * (max_m gap_m -
min_m gap_m) (for M = 2, the original (2/3) alpha |gap_a - gap_v|) decides how many copies to add:
int(D * N) random training samples, each copy keeping only one low-contribution modality (others zeroed).

Defaults: warmup_epochs = 5, part_ratio = 0.2, alpha = 1.0 (the original script). alpha = 0 adds no copy
and the run is bit-identical to `none`.
M > 2: yes. Each copy keeps modality m with probability proportional to gap_m - min_k gap_k, so for M = 2
every copy keeps the modality with the larger gap, as in the original.

Distributed: Z, the copy indices and the modality draws come from generators seeded by (seed, epoch) and
are identical on every rank; the Shapley values on Z are computed on shards and gathered.

Differences from the official code, on purpose: the original computes contributions on the whole
training set and then averages over Z (the point of Z is to value only Z, done here); Z is drawn without
replacement. Valuation reads `train_eval`-equivalent data (train split, no augmentation), never test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmbalance_llm.balance import register
from mmbalance_llm.balance._valuation import (ResamplingState, resampling_score, sample_shapley, subset_loader)
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class ModalityValuationConfig(BalancerConfig):
    warmup_epochs: int = hp(5, "Epochs of plain training before the first valuation (0-based epoch of the first re-sampling).", min=0)
    part_ratio: float = hp(0.2, "Fraction of the training set valued each epoch (Z in the paper).", min=0.0, max=1.0)
    alpha: float = hp(1.0, "Scale of the number of re-sampled copies; 0 disables re-sampling.", min=0.0)


def modality_copies(phi_mean: torch.Tensor, modalities, num_samples: int, alpha: float, gen: torch.Generator):
    """(copies, discrepancy) from the mean contribution scores c_m over Z (gap_m = 1 - c_m)."""
    gap = 1.0 - phi_mean.double()  # float64 and the official operation order: int() sits on a step
    spread = float(gap.max() - gap.min())
    discrepancy = spread / 3 * 2 * alpha
    k = int(discrepancy * num_samples)
    if k <= 0 or spread <= 0:
        return [], discrepancy
    idx = torch.randint(num_samples, (k,), generator=gen)
    weights = (gap - gap.min()).double()
    which = torch.multinomial(weights / weights.sum(), k, replacement=True, generator=gen)
    return [(int(i), (modalities[int(j)],)) for i, j in zip(idx, which)], discrepancy


@register
class ModalityValuation(ResamplingState, Balancer):
    name = "modality_valuation"
    stage = "data"
    paper = "Wei et al., CVPR 2024 (modality-level valuation)"
    config_class = ModalityValuationConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not 0 < c.part_ratio <= 1:
            raise ValueError(f"balance.part_ratio must be in (0, 1], got {c.part_ratio}")
        if c.alpha < 0:
            raise ValueError(f"balance.alpha must be >= 0, got {c.alpha}")
        if c.warmup_epochs < 0:
            raise ValueError(f"balance.warmup_epochs must be >= 0, got {c.warmup_epochs}")
        self.copies: list = []

    def on_epoch_start(self, model, epoch):
        self.copies = []
        c, ctx = self.config, self.ctx
        if epoch < c.warmup_epochs or c.alpha == 0:
            return
        data = ctx.train_dataset
        n = len(data)
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + epoch)
        part = torch.randperm(n, generator=gen)[: max(1, int(c.part_ratio * n))].sort().values
        loader = ctx.accelerator.prepare_data_loader(
            subset_loader(data, part, ctx.eval_batch_size, ctx.num_workers))
        # Subset items carry their original index, so the table is indexed by training-set position.
        phi, full = sample_shapley(model, loader, ctx.accelerator, ctx.modalities, n)
        phi_mean = torch.nanmean(resampling_score(phi, full)[part], dim=0)
        self.copies, disc = modality_copies(phi_mean, ctx.modalities, n, c.alpha, gen)
        stats = {f"phi_{m}": float(v) for m, v in zip(ctx.modalities, phi_mean)}
        stats.update(discrepancy=disc, resampled=len(self.copies))
        ctx.log({"step": ctx.global_step, "epoch": epoch + 1, "split": "valuation", **stats})
