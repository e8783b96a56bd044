"""`opm`: On-the-fly Prediction Modulation (feature dropping of the dominant modality).

Wei, Hu et al., "On-the-fly Modulation for Balanced Multimodal Learning", T-PAMI 2024 (OPM). Stage:
feed-forward.
Follows: GeWu-Lab/BML_TPAMI2024@4b3aa4fd841856c4acbebf48549e6c59fbf7635e:code/main.py and
code/models/fusion_model.py (`scripts/train_opm.sh`, the paper's main CREMA-D / Kinetics-Sounds setting).

Per training step, from the split-head logits of the *unmasked* features: s_m = sum_i softmax(z_m)_i[y_i]
(summed over all processes), rho_m = s_m / mean_{k != m} s_k, rho~_m = tanh(relu(rho_m - 1)). The drop rate
is q_m = clip(q_base * (1 + lambda * rho~_m), 0, 1) where rho~_m > 0, else 0, so only dominant modalities
are ever dropped. With probability p_exe the step drops features: a Bernoulli(1 - q_m) keep mask per sample
and modality zeroes h_m, every feature is rescaled by 1 / (1 - theta), theta = sum_m d_m q_m / sum_m d_m,
and the fused logits are recomputed from the masked features (the encoders run once). The loss is the
fused cross-entropy over samples that keep at least one modality.

Defaults: q_base = 0.5, lam = 0.5, p_exe = 0.7 (the official script), and the official warm-up: features
are dropped only from epoch 6 (0-based) on, since the official loop sets `warm_up = 1 if epoch <= 5`
(six warm-up epochs 0-5, the paper's "5 warm-up epochs" counted from 1). q_base = 0 is bit-identical to `none`.

Differences from the official code: the drop mask is drawn per (seed, step, rank) instead of the global RNG;
the official skips a step whose every sample lost all modalities, here that step's loss is 0 over no kept
sample: a zero gradient, but the optimizer and schedule still step (AdamW's momentum and weight decay move).
M > 2: yes, rho_m against the mean of the other modalities (BB's M = 3 variant divides by their sum, which
makes every rho < 1 for balanced modalities and so never drops).

The dropping is a forward pre-hook on the model's fusion head, installed only while the balancer runs
the training forward, so the model keeps its output contract and evaluation sees no masking. The
execute-or-not draw is seeded by (seed, step), identical on every rank; the per-sample masks by
(seed, step, rank). Needs split unimodal logits (`fusion: concat` or `sum`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs
from mmbalance_llm.balance.common import ratio_to_others, true_class_scores


@dataclass
class OPMConfig(BalancerConfig):
    q_base: float = hp(0.5, "Base drop rate of a dominant modality's features; 0 disables OPM.", min=0.0, max=1.0)
    lam: float = hp(0.5, "lambda: how much the dominance rho~ raises the drop rate.", min=0.0)
    p_exe: float = hp(0.7, "Probability that a step drops features.", min=0.0, max=1.0)
    modulation_starts: int = hp(6, "First epoch (0-based) with modulation; epochs 0-5 are the official warm-up.", min=0)
    modulation_ends: int = hp(10_000, "Last epoch (0-based, inclusive) with modulation.", min=0)


def opm_drop_rates(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """q_m = clip(q_base (1 + lam tanh(relu(rho_m - 1))), 0, 1) for rho_m > 1, else 0."""
    rho = torch.tanh(torch.relu(ratio_to_others(scores.float()) - 1))
    q = (q_base * (1 + lam * rho)).clamp(0, 1)
    return torch.where(rho > 0, q, torch.zeros_like(q))


@register
class OPM(Balancer):
    name = "opm"
    stage = "feed-forward"
    paper = "Wei et al., T-PAMI 2024 (on-the-fly prediction modulation, OPM)"
    requires_unimodal_logits = True
    config_class = OPMConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        for key in ("q_base", "p_exe"):
            if not 0 <= getattr(c, key) <= 1:
                raise ValueError(f"balance.{key} must be in [0, 1], got {getattr(c, key)}")
        if c.lam < 0:
            raise ValueError(f"balance.lam must be >= 0, got {c.lam}")
        self._kept = None
        self.last_drop_rates = None

    def setup(self, ctx, model):
        super().setup(ctx, model)
        fusion = getattr(ctx.unwrap(model), "fusion", None)
        if not hasattr(fusion, "unimodal"):
            raise ValueError("balance.method 'opm' needs a fusion head with split unimodal logits "
                             "(model.fusion concat or sum)")

    def _active(self) -> bool:
        c = self.config
        return c.q_base > 0 and c.modulation_starts <= self.ctx.epoch <= c.modulation_ends

    def _mask_features(self, fusion, labels, features: dict) -> dict:
        ctx, c = self.ctx, self.config
        names = list(features)
        with torch.no_grad():
            uni = {m: fusion.unimodal(m, features[m]) for m in names}
            scores = ctx.reduce_sum(true_class_scores(uni, labels))
        q = opm_drop_rates(scores, c.q_base, c.lam)
        self.last_drop_rates = dict(zip(names, q.tolist()))
        step = ctx.global_step
        execute = torch.rand((), generator=torch.Generator().manual_seed(ctx.seed * 1_000_003 + step)) < c.p_exe
        if not execute or float(q.max()) == 0:
            return features
        gen = torch.Generator().manual_seed((ctx.seed * 1_000_003 + step) * 64 + ctx.accelerator.process_index)
        batch = len(labels)
        keep = torch.rand(batch, len(names), generator=gen) >= q  # [B, M]
        dims = torch.tensor([features[m].shape[-1] for m in names], dtype=torch.float)
        theta = float((dims * q).sum() / dims.sum())
        scale = 1.0 / (1.0 - theta)
        self._kept = keep.any(dim=1)
        out = {}
        for j, m in enumerate(names):
            h = features[m]
            mask = keep[:, j].to(h.device, h.dtype).view(-1, *([1] * (h.dim() - 1)))
            out[m] = h * mask * scale
        return out

    def forward(self, model, batch):
        self._kept = None
        if not self._active():
            return super().forward(model, batch)
        fusion = self.ctx.unwrap(model).fusion
        labels = batch["labels"]
        handle = fusion.register_forward_pre_hook(
            lambda mod, args: (self._mask_features(mod, labels, args[0]),) + tuple(args[1:]))
        try:
            return model(**model_inputs(batch, self.ctx.modalities))
        finally:
            handle.remove()

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        logs = {f"opm_q_{m}": q for m, q in (self.last_drop_rates or {}).items()} if self._active() else {}
        if self._kept is None or bool(self._kept.all()):
            return F.cross_entropy(outputs.logits, labels), logs
        kept = self._kept.to(labels.device)
        # Mean over kept samples, written as a masked sum so the graph stays the same on every rank.
        per = F.cross_entropy(outputs.logits, labels, reduction="none")
        return (per * kept).sum() / kept.sum().clamp_min(1), logs
