"""`pmr`: Prototypical Modal Rebalance.

Fan, Xu, Wei, Hu, Wu, "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023.
Stage: optimization (it rebalances the encoders' updates through a prototype loss term).

- Prototypes. At the start of every epoch, c_m^k = mean of h_m over the training samples of class k in the
  first `proto_ratio` of the (ordered) training batches, summed over every process; then the EMA of the
  original code, c <- (1 - momentum) * c_new + momentum * c_old. A class absent from that slice keeps
  its previous prototype. The prototypes are part of the balancer state, so a resumed run keeps them.
- Per step: prototype logits -||h_m - c_m^k||_2 over classes k, s_m = sum_i softmax(.)[y_i] (reduced over
  processes), rho_m = s_m / mean_{k != m} s_k. Loss = CE(z) + alpha * sum_{m: rho_m < 1} CE(-||h_m - c_m||, y),
  i.e. the prototypical cross-entropy boosts the slower modality only (for M = 2: beta = alpha when
  rho_audio < 1, lambda = alpha when rho_audio > 1, as in the original code).

Defaults: alpha = 1.0, momentum = 0.2, proto_ratio = 0.1, modulation on epochs 0-100 (original
`main_Prototype_grad.py`; BalanceBenchmark uses alpha = 0.6 and momentum 0.5).
M > 2: supported; every modality whose prototype score is below the mean of the others gets the term
(BalanceBenchmark falls back to OGM-style scaling for M = 3 and drops the prototypes).
Works with any fusion (it reads features, not split logits). Deliberate differences from the reference
code: prototypes are computed from the ordered `train_eval` loader (deterministic, no augmentation) rather
than the shuffled one; the paper's optional prototype-entropy regulariser is not in the authors' code and
is not implemented. alpha = 0 reproduces the baseline exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs
from mmbalance_llm.balance.common import ratio_to_others


@dataclass
class PMRConfig(BalancerConfig):
    alpha: float = hp(1.0, "Weight of the prototypical cross-entropy on the slower modality. 0 disables it.")
    momentum: float = hp(0.2, "EMA momentum of the prototypes: c = (1 - momentum) * c_new + momentum * c_old.")
    proto_ratio: float = hp(0.1, "Fraction of the training batches used to compute the prototypes each epoch.")
    modulation_starts: int = hp(0, "First epoch (0-based) with the prototype term.")
    modulation_ends: int = hp(100, "Last epoch (0-based, inclusive) with the prototype term.")


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

    @torch.no_grad()
    def compute_prototypes(self, model) -> dict:
        """Class means of h_m over the first `proto_ratio` of the train_eval batches, over all processes."""
        ctx, net = self.ctx, self.ctx.unwrap(model)
        loader = ctx.loaders["train_eval"]
        n_batches = max(1, math.ceil(self.config.proto_ratio * len(loader)))
        was_training = net.training
        net.eval()
        sums, counts = None, torch.zeros(ctx.num_classes)
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            feats = net.encode(**model_inputs(batch, ctx.modalities))
            onehot = F.one_hot(batch["labels"], ctx.num_classes).float()
            part = {m: (onehot.t() @ h.float()).cpu() for m, h in feats.items()}
            sums = part if sums is None else {m: sums[m] + part[m] for m in part}
            counts += onehot.sum(0).cpu()
        net.train(was_training)
        device = next(net.parameters()).device
        flat = self.ctx.reduce_sum(torch.cat([counts[:, None]] + [sums[m] for m in ctx.modalities], 1).to(device))
        counts, new = flat[:, 0].cpu(), {}
        dims = [sums[m].shape[1] for m in ctx.modalities]
        for m, block in zip(ctx.modalities, flat[:, 1:].cpu().split(dims, dim=1)):
            mean = block / counts.clamp_min(1)[:, None]
            old = self.prototypes.get(m)
            if old is None:
                new[m] = mean
            else:
                present = (counts > 0)[:, None]
                mixed = (1 - self.config.momentum) * mean + self.config.momentum * old
                new[m] = torch.where(present, mixed, old)
        return new

    def on_epoch_start(self, model, epoch):
        self.prototypes = self.compute_prototypes(model)

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
