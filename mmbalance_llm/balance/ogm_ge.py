"""`ogm_ge`: On-the-fly Gradient Modulation with Generalization Enhancement.

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022 (OGM-GE), and
Wei et al., T-PAMI 2024 (OGM). Stage: optimization.
Follows: GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54:main.py (`train_epoch`).
Defaults are the official CREMA-D settings (alpha 0.8, modulation epochs 0-50).

Per step, from the split-head logits: s_m = sum_i softmax(z_m)_i[y_i] (summed over all processes),
rho_m = s_m / mean_{k != m} s_k, and k_m = 1 - tanh(alpha * rho_m) when rho_m > 1 (the dominant
modality only), else 1. Encoder m's gradient becomes k_m * g (OGM), plus, with `modulation: OGM_GE`,
Gaussian noise N(0, std(g)^2) on every weight tensor of every modality, with std(g) the std of the
**unscaled** gradient g (official: `grad * coeff + normal(0, grad.std())`, the std read before scaling).
The scaling runs as a hook on h_m, so p.grad already holds k_m * g when the noise is drawn; the noise std
is therefore std(p.grad) / k_m, which is exactly std(g) (the hook scales every encoder-m gradient by k_m).

Differences from the official code:
- the scaling acts on the gradient flowing into h_m (a tensor hook), which scales every parameter of
  encoder m; the official scales only 4-D conv weights (BalanceBenchmark: all non-bias weights).
  The noise is added to weight tensors (dim > 1) only, after the all-reduce, identical on every rank
  (the official: 4-D conv weights); it is drawn from a generator seeded by (seed, step);
- with gradient accumulation the noise std divides by the last micro-batch's k_m;
- M > 2: rho_m compares with the mean of the other modalities (the toolkit's M = 3 variant compares with
  the minimum, and its averaging variant has a mis-indented division).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp
from mmbalance_llm.balance.common import ratio_to_others, scale_feature_grad, true_class_scores


@dataclass
class OGMConfig(BalancerConfig):
    alpha: float = hp(0.8, "Modulation strength alpha in k = 1 - tanh(alpha * rho). 0 disables the scaling.", min=0.0)
    modulation: str = hp("OGM_GE", "'OGM_GE' (scaling + Gaussian noise) or 'OGM' (scaling only).")
    modulation_starts: int = hp(0, "First epoch (0-based) with modulation.", min=0)
    modulation_ends: int = hp(50, "Last epoch (0-based, inclusive) with modulation.", min=0)


def ogm_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """k_m = 1 - tanh(alpha * rho_m) where rho_m > 1, else 1."""
    rho = ratio_to_others(scores)
    return torch.where(rho > 1, 1 - torch.tanh(alpha * rho), torch.ones_like(rho))


@register
class OGMGE(Balancer):
    name = "ogm_ge"
    stage = "optimization"
    paper = "Peng et al., CVPR 2022 (OGM-GE); Wei et al., T-PAMI 2024 (OGM)"
    requires_unimodal_logits = True
    config_class = OGMConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.modulation not in ("OGM_GE", "OGM"):
            raise ValueError(f"balance.modulation must be 'OGM_GE' or 'OGM', got {self.config.modulation!r}")
        self.needs_param_grads = self.config.modulation == "OGM_GE"
        self._active = False
        self._coeffs: dict = {}

    def loss(self, model, batch, outputs):
        loss, logs = super().loss(model, batch, outputs)
        c = self.config
        self._active = c.modulation_starts <= self.ctx.epoch <= c.modulation_ends
        if not self._active:
            return loss, logs
        scores = self.ctx.reduce_sum(true_class_scores(outputs.unimodal_logits, batch["labels"]))
        coeffs = ogm_coefficients(scores, c.alpha)
        names = list(outputs.unimodal_logits)
        self._coeffs = dict(zip(names, coeffs.tolist()))
        scale_feature_grad(outputs.features, self._coeffs)
        logs.update({f"ogm_coeff_{m}": float(k) for m, k in zip(names, coeffs)})
        return loss, logs

    def after_backward(self, model, step):
        if not (self._active and self.config.modulation == "OGM_GE"):
            return
        # Same seed on every rank: the (already all-reduced) gradients get identical noise.
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + step)
        unwrapped = self.ctx.unwrap(model)
        for m in self.ctx.modalities:
            k = float(self._coeffs.get(m, 1.0))
            for _, p in unwrapped.modality_parameters(m):
                if p.grad is None or p.grad.dim() < 2:
                    continue
                # p.grad = k * g (the hook); the official noise std is that of the unscaled g.
                std = p.grad.float().std().item() / (k if k > 0 else 1.0) + 1e-8
                noise = torch.randn(p.grad.shape, generator=gen) * std
                p.grad.add_(noise.to(p.grad.device, p.grad.dtype))
