"""`gblending`: Gradient-Blending.

Wang, Tran & Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020.
Stage: objective.
Follows: the paper (Sec. 3.3, Eq. 5-6 and online G-Blend, Algorithm 1); no official code. Compared with
GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3:balancemm/trainer/GBlending_trainer.py (`super_epoch_origin`).

The loss blends the fused and the unimodal (split-head) cross-entropies,

    L = w_mm CE(z) + sum_m w_m CE(z_m),

with weights from each "model"'s generalization-to-overfitting ratio. For each modality m and for the
fused model, a copy of the current model is trained for `super_epoch` epochs on the training data with
every other modality's input zeroed (none zeroed for the fused copy). With train/validation losses
measured before (start) and after (end) that training:

    G = L^V_end - L^V_start,   O = (L^V_end - L^T_end) - (L^V_start - L^T_start),   w = |G / O^2|,

normalised to sum to 1. The losses of a copy are the mean CE of its fused logits on the (masked) training
and VALIDATION splits; test is never read.

Modes: `online` re-estimates the weights every `super_epoch` epochs from the current model (the paper's
online G-Blend); `offline` estimates them once, from the initial model, and keeps them.
Cost: in online mode each estimation trains M + 1 copies for `super_epoch` epochs, so the whole run costs
about (M + 2)x the baseline's training compute (1x for the model itself, (M + 1)x for the copies), plus
two evaluations per copy. Offline adds (M + 1) x super_epoch epochs once. Use a smaller `super_epoch` in
quick runs (the tests use 1).

Defaults: super_epoch = 10, mode = online (reference toolkit). Copies use AdamW with the recipe's lr and
weight decay.

Distributed: the copies train on each rank's shard with their gradients averaged over processes after
every step (they are not DDP-wrapped), and the losses are summed over processes, so every rank computes
the same weights.

M > 2: supported (one copy per modality plus the fused copy).

Differences from BalanceBenchmark, on purpose (its weights differ from these by up to ~0.4 on the same
model): BB's "start" losses are measured after the copy's *first* training epoch, not before training
(so with super_epoch = 1 it has no end point and its "end" losses stay 0), its training loss is the
running sum of the batch losses seen while training (train mode, weights moving), and both losses are
sums over batches rather than means; here they are means over the whole split, in eval mode, before and
after the copy's training, as the paper's L^T_n, L^V_n. BB's validation is the test set when a dataset has
no validation split; here the validation split is used. The estimation restarts from the current model
at every super-epoch as in the paper. BB's copies reuse the main optimizer's state; here each copy gets a
fresh AdamW.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance._objective import accumulate_grads
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp

FUSED = "__fused__"


@dataclass
class GBlendingConfig(BalancerConfig):
    super_epoch: int = hp(10, "Epochs between weight estimations, and epochs each model copy is trained for.", min=1)
    mode: str = hp("online", "'online' (re-estimate every super_epoch) or 'offline' (estimate once at the start).")


def blend_weights(stats: dict) -> dict:
    """stats: {name: (LT_start, LV_start, LT_end, LV_end)} -> normalised |G / O^2|."""
    raw = {}
    for name, (lt0, lv0, lt1, lv1) in stats.items():
        g = lv1 - lv0
        o = (lv1 - lt1) - (lv0 - lt0)
        raw[name] = abs(g / max(o * o, 1e-12))
    total = sum(raw.values())
    if not total > 0:
        return {name: 1.0 / len(raw) for name in raw}
    return {name: v / total for name, v in raw.items()}


def masked(batch: dict, modalities, keep) -> dict:
    return {m: (batch[m] if keep is None or m == keep else torch.zeros_like(batch[m])) for m in modalities}


@register
class GBlending(Balancer):
    name = "gblending"
    stage = "objective"
    paper = "Wang, Tran & Feiszli, What Makes Training Multi-Modal Classification Networks Hard?, CVPR 2020"
    requires_unimodal_logits = True
    config_class = GBlendingConfig
    zero_stages = (0, 1, 2)
    zero_stages_reason = "it trains full copies of the model, which ZeRO-3 partitions"

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.mode not in ("online", "offline"):
            raise ValueError(f"balance.mode must be 'online' or 'offline', got {self.config.mode!r}")
        if self.config.super_epoch < 1:
            raise ValueError(f"balance.super_epoch must be >= 1, got {self.config.super_epoch}")
        self.weights = None

    # -- estimation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _mean_loss(self, net, loader, keep) -> float:
        total = torch.zeros(2, dtype=torch.float64)
        for batch in loader:
            logits = net(**masked(batch, self.ctx.modalities, keep)).logits
            total += torch.tensor([float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum")),
                                   float(len(batch["labels"]))], dtype=torch.float64)
        total = self.ctx.reduce_sum(total.to(self.ctx.accelerator.device)).cpu()
        return float(total[0] / total[1].clamp_min(1))

    def _losses(self, net, keep):
        net.eval()
        out = (self._mean_loss(net, self.ctx.loaders["train_eval"], keep),
               self._mean_loss(net, self.ctx.loaders["validation"], keep))
        net.train()
        return out

    def estimate(self, model, epoch: int) -> dict:
        cfg = self.ctx.recipe.train
        base = self.ctx.unwrap(model)
        stats = {}
        for keep in [None] + list(self.ctx.modalities):
            net = copy.deepcopy(base)
            net.train()
            lt0, lv0 = self._losses(net, keep)
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            loader = self.ctx.loaders["train"]
            for e in range(self.config.super_epoch):
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch * 1000 + e)  # its own seeded order, same on every rank
                for batch in loader:
                    opt.zero_grad()
                    logits = net(**masked(batch, self.ctx.modalities, keep)).logits
                    F.cross_entropy(logits, batch["labels"]).backward()
                    accumulate_grads(self.ctx, params)
                    opt.step()
            lt1, lv1 = self._losses(net, keep)
            stats[FUSED if keep is None else keep] = (lt0, lv0, lt1, lv1)
            del net, opt
        return blend_weights(stats)

    def on_epoch_start(self, model, epoch):
        c = self.config
        due = self.weights is None if c.mode == "offline" else (epoch % c.super_epoch == 0 or self.weights is None)
        if due:
            self.weights = self.estimate(model, epoch)

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        if self.weights is None:
            self.weights = self.estimate(model, self.ctx.epoch)
        w = self.weights
        loss = w[FUSED] * F.cross_entropy(outputs.logits, labels)
        for m, z in outputs.unimodal_logits.items():
            loss = loss + w[m] * F.cross_entropy(z, labels)
        return loss, {f"gb_w_{'mm' if k == FUSED else k}": v for k, v in w.items()}

    def state_dict(self):
        return {"weights": self.weights}

    def load_state_dict(self, state):
        self.weights = state.get("weights", self.weights)
