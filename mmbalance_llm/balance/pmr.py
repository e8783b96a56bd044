"""`pmr`: Prototypical Modal Rebalance.

Fan, Xu, Wei, Hu, Wu, "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023.
Stage: optimization (it rebalances the encoders' updates through a prototype loss term).
Follows: fanyunfeng-bit/Modal-Imbalance-PMR@3615e48983555089b0e693380087617c3797a641:main_Prototype_grad.py
(`calculate_prototype`, `train_epoch`). Defaults are the official script's (CREMA-D / KS: alpha 1.0,
momentum_coef 0.2, one tenth of the training batches, modulation epochs 0-100).

- Prototypes. Before every epoch, c_m^k = mean of h_m (eval mode) over the training samples of class k
  among the first P = max(1, floor(proto_ratio * n)) training batches (n = batches per epoch, official
  `all_num // 10`): here the first P * global_batch samples of a seeded permutation of the training set
  (seed, epoch), i.e. a fresh random tenth each epoch like the official shuffled loader. The prototypes
  used in epochs 0 and 1 are plain means (the official applies no moving average to the initial
  prototypes nor to those computed after epoch 0, `if epoch <= 0`); from epoch 2 on
  c <- (1 - momentum) * c_new + momentum * c_old. `ema_from_epoch` moves that start.
- Per step: prototype logits -||h_m - c_m^k||_2 over classes k, s_m = sum_i softmax(.)[y_i] (reduced over
  processes), rho_m = s_m / mean_{k != m} s_k. Loss = CE(z) + alpha * sum_{m: rho_m < 1} CE(-||h_m - c_m||, y),
  i.e. the prototypical cross-entropy boosts the slower modality only (for M = 2: beta = alpha when
  rho_audio < 1, lambda = alpha when rho_audio > 1, as in the official code).

1 vs 2 processes: every rank computes the prototypes itself from the same samples (an unsharded ordered
loader over the chosen subset), so prototypes do not depend on the number of processes or the evaluation
batch size; the per-step statistics are reduced, so at the same global batch both runs take the same steps.

Differences from the official code:
- the prototype samples are drawn from the (un-augmented) training set with a seeded permutation instead of
  the first batches of the augmented shuffled loader; a class absent from the sample keeps its previous
  prototype (the official divides by a zero count);
- M > 2: every modality whose prototype score is below the mean of the others gets the term
  (BalanceBenchmark falls back to OGM-style scaling for M = 3 and drops the prototypes);
- works with any fusion (it reads features, not split logits); the paper's optional prototype-entropy
  regulariser is not in the official code and is not implemented; BalanceBenchmark uses alpha 0.6,
  momentum 0.5. alpha = 0 reproduces the baseline exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp
from mmbalance_llm.balance.common import ratio_to_others


@dataclass
class PMRConfig(BalancerConfig):
    alpha: float = hp(1.0, "Weight of the prototypical cross-entropy on the slower modality. 0 disables it.", min=0.0)
    momentum: float = hp(0.2, "EMA momentum of the prototypes: c = (1 - momentum) * c_new + momentum * c_old.", min=0.0, max=1.0)
    proto_ratio: float = hp(0.1, "Fraction of the training batches used to compute the prototypes each epoch.", min=0.0, max=1.0, min_exclusive=True)
    modulation_starts: int = hp(0, "First epoch (0-based) with the prototype term.", min=0)
    modulation_ends: int = hp(100, "Last epoch (0-based, inclusive) with the prototype term.", min=0)
    ema_from_epoch: int = hp(2, "First epoch whose prototypes are a moving average (official: epochs 0 and 1 use plain means).")


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-||h - c_k||_2 for every class k: [B, C]."""
    return -torch.cdist(features.float(), prototypes.float())


@register
class PMR(Balancer):
    name = "pmr"
    stage = "optimization"
    paper = "Fan et al., PMR: Prototypical Modal Rebalance for Multimodal Learning, CVPR 2023"
    config_class = PMRConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not 0 < c.proto_ratio <= 1:
            raise ValueError(f"balance.proto_ratio must be in (0, 1], got {c.proto_ratio}")
        if not 0 <= c.momentum < 1:
            raise ValueError(f"balance.momentum must be in [0, 1), got {c.momentum}")
        self.prototypes: dict = {}

    def prototype_indices(self, epoch: int, num_samples: int) -> list:
        """The training samples the prototypes of `epoch` are computed from (identical on every rank)."""
        ctx = self.ctx
        n_batches = max(1, len(ctx.loaders["train"]))
        global_batch = ctx.recipe.train.per_device_train_batch_size * ctx.accelerator.num_processes
        # floor as the official `all_num // 10`; the epsilon keeps 0.1 * 30 from flooring to 2
        count = min(num_samples, max(1, math.floor(self.config.proto_ratio * n_batches + 1e-9)) * global_batch)
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 7919 * epoch + 17)
        return torch.randperm(num_samples, generator=gen)[:count].tolist()

    @torch.no_grad()
    def compute_prototypes(self, model, epoch: int = 0) -> dict:
        """Class means of h_m over `prototype_indices(epoch)`, then the official moving average."""
        from mmbalance_llm.balance._valuation import subset_loader

        ctx, net = self.ctx, self.ctx.unwrap(model)
        dataset = ctx.train_dataset
        loader = subset_loader(dataset, self.prototype_indices(epoch, len(dataset)), ctx.eval_batch_size)
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        sums, counts = None, torch.zeros(ctx.num_classes, dtype=torch.float64)
        for batch in loader:
            feats = net.encode(**{m: batch[m].to(device) for m in ctx.modalities})
            onehot = F.one_hot(batch["labels"], ctx.num_classes).double()
            part = {m: onehot.t() @ h.double().cpu() for m, h in feats.items()}
            sums = part if sums is None else {m: sums[m] + part[m] for m in part}
            counts += onehot.sum(0)
        net.train(was_training)
        new = {}
        for m in ctx.modalities:
            mean = (sums[m] / counts.clamp_min(1)[:, None]).float()
            old = self.prototypes.get(m)
            if old is None:
                new[m] = mean
                continue
            present = (counts > 0)[:, None]
            if epoch >= self.config.ema_from_epoch:
                mean = (1 - self.config.momentum) * mean + self.config.momentum * old
            new[m] = torch.where(present, mean, old)
        return new

    def on_epoch_start(self, model, epoch):
        self.prototypes = self.compute_prototypes(model, epoch)

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        loss = F.cross_entropy(outputs.logits, labels)
        c = self.config
        if c.alpha == 0 or not (c.modulation_starts <= self.ctx.epoch <= c.modulation_ends) or not self.prototypes:
            return loss, {}
        mods = self.ctx.modalities
        proto = {m: prototype_logits(outputs.features[m], self.prototypes[m].to(outputs.features[m].device))
                 for m in mods}
        with torch.no_grad():
            scores = torch.stack([torch.softmax(proto[m], -1).gather(1, labels[:, None]).sum() for m in mods])
            scores = self.ctx.reduce_sum(scores)
        rho = ratio_to_others(scores)
        logs = {f"pmr_rho_{m}": float(r) for m, r in zip(mods, rho)}
        for m, r in zip(mods, rho.tolist()):
            if r < 1:
                loss = loss + c.alpha * F.cross_entropy(proto[m], labels)
        return loss, logs

    def state_dict(self):
        return {f"prototype.{m}": p.clone().contiguous() for m, p in self.prototypes.items()}

    def load_state_dict(self, state):
        self.prototypes = {k[len("prototype."):]: v.float() for k, v in state.items() if k.startswith("prototype.")}
