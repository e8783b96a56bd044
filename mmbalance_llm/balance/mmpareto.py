"""`mmpareto`: Pareto integration of the multimodal and unimodal gradients of each encoder.

Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024.
Stage: objective (loss-level multitask learning with gradient integration).
Follows: GeWu-Lab/MMPareto_ICML2024@a339db39cc25b157df376b50bb894917dc6c01d6:code/MMPareto.py (CREMA-D setting,
gamma 1.5); `rescale: tensor` reproduces its per-tensor rescale exactly.

Losses: L_mm = CE(z) on the fused logits and, for every modality, L_m = CE(z_m) on its split-head logits.
For encoder m, with g_mm = dL_mm/dtheta_m and g_m = dL_m/dtheta_m (computed separately):
- cos(g_mm, g_m) > 0: weights (1/2, 1/2); otherwise the min-norm (MGDA) weights of the two;
- new = 2 (w_mm g_mm + w_m g_m), rescaled up to the norm of the summed-loss gradient g_mm + g_m when it is
  smaller, then multiplied by gamma (1.5). The rescale is one factor per encoder (`rescale: encoder`), so
  the integrated gradient keeps the min-norm direction, which has a non-negative inner product with both
  g_mm and g_m (the paper's "innocent" unimodal assistance).
The fusion head gets the plain gradient of L_mm + sum_m L_m.

Defaults: gamma = 1.5 (paper and reference toolkit), `gradient_space: parameter`, `rescale: encoder`.

How the per-loss gradients are obtained (cost; the original does three full backward passes):
the encoders are disjoint, so one vector-Jacobian product of L_mm w.r.t. every feature h_m gives all
multimodal cotangents c_mm^m at once and one of sum_m L_m gives every c_m (both are head-only backward
passes, cheap). Then
- `gradient_space: parameter` (exact, default): two encoder backward passes (torch.autograd.grad of the
  features w.r.t. the encoder parameters with the two cotangents) give g_mm and g_m for every M; the cosine
  test, the MGDA weights and the rescale are computed on these parameter gradients exactly as in the
  paper. The combined gradient enters p.grad through a zero-valued linear surrogate term, so the
  trainer's single `accelerator.backward` still runs (DDP all-reduces it) and only walks the head.
  With the default `rescale: encoder` the rule and the surrogate act on one flat vector per encoder
  (`integrate_flat`, `flat_surrogate`: bitwise the per-tensor result). Cost ~ (F + 2B) / (F + B): ~1.67x
  the baseline step with Transformer encoders on CPU against a floor (forward + the two VJPs) of ~1.55x
  (benchmarks/mmpareto_step.py, docs/speed.md); no exact variant needs fewer encoder passes.
- `gradient_space: feature` (approximate, cheaper, 1.01-1.04x with Transformer encoders): the cosine
  test, the MGDA weights and the rescale are computed on the cotangents c_mm^m, c_m (the gradients
  w.r.t. h_m of the whole batch), and the combined cotangent is pushed through the encoder with one
  backward. This equals the paper's rule only when J_m J_m^T is proportional to the identity on the
  cotangent span (the rescale is per encoder). docs/objective.md reports how the two agree on real runs.

Distributed: in parameter mode the flat g_mm, g_m are averaged over processes before the rule, so every
rank applies the same combined gradient (that of the global batch); in feature mode the per-modality Gram
entries are summed over processes (inner products over a batch split across ranks add up).

M > 2: supported; the rule acts per modality on its (g_mm, g_m) pair, as in the paper.

Differences from the original code and the reference toolkit (BalanceBenchmark), on purpose:
- the original code rescales each parameter tensor by its own factor; that changes the direction of the
  encoder's update and can make it conflict with g_mm or g_m again (the tests construct such a case), so
  the default rescales the whole encoder gradient by one factor; `rescale: tensor` reproduces the code;
- the per-loss gradients are computed separately (BB accumulates them without zeroing, so cos = 1 always
  and the conflict branch never fires; its min-norm branch also writes to the wrong variable);
- unimodal logits come from the split fused head (as BB); the original repository trains extra unimodal
  heads. This keeps the model contract unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance._objective import (
    allreduce_mean_, flatten, linear_surrogate, pareto_weights, unflatten,
)
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class MMParetoConfig(BalancerConfig):
    gamma: float = hp(1.5, "Scale applied to the integrated encoder gradient (paper: 1.5).", min=0.0)
    gradient_space: str = hp("parameter", "'parameter' (exact per-loss encoder gradients, two encoder backward "
                                          "passes) or 'feature' (cosine/MGDA on the feature cotangents, one pass).")
    rescale: str = hp("encoder", "Norm rescale of the integrated gradient: 'encoder' (one factor per encoder, keeps the "
                                 "min-norm direction) or 'tensor' (one per parameter tensor, as the original code).")


def integrate(g_mm: list, g_u: list, gamma: float, per_tensor: bool = False) -> tuple[list, bool, tuple]:
    """The paper's per-encoder rule on parameter gradients (lists of tensors of one encoder)."""
    a, b = flatten(g_mm).double(), flatten(g_u).double()
    gram = torch.tensor([[a @ a, a @ b], [a @ b, b @ b]])
    w_mm, w_u, conflict = pareto_weights(gram)
    new = [2 * (w_mm * gm + w_u * gu) for gm, gu in zip(g_mm, g_u)]
    if per_tensor:
        pairs = [(n.norm(), (gm + gu).norm()) for n, gm, gu in zip(new, g_mm, g_u)]
    else:
        pairs = [(flatten(new).norm(), (a + b).norm())] * len(new)
    out = [gamma * (total / norm if norm > 0 and total > norm else 1.0) * n for n, (norm, total) in zip(new, pairs)]
    return out, conflict, (w_mm, w_u)


def integrate_flat(a: torch.Tensor, b: torch.Tensor, gamma: float) -> tuple[torch.Tensor, bool, tuple]:
    """`integrate` with one rescale per encoder on the encoder's flat gradients `a` = g_mm, `b` = g_m:
    the same operations in the same order on one vector instead of one per tensor, so bitwise the same
    result without ~10 small ops per parameter tensor."""
    a64, b64 = a.double(), b.double()
    gram = torch.tensor([[a64 @ a64, a64 @ b64], [a64 @ b64, b64 @ b64]])
    w_mm, w_u, conflict = pareto_weights(gram)
    new = 2 * (w_mm * a + w_u * b)
    norm, total = new.norm(), (a64 + b64).norm()
    return gamma * (total / norm if norm > 0 and total > norm else 1.0) * new, conflict, (w_mm, w_u)


def flat_surrogate(params, flat_grad: torch.Tensor) -> torch.Tensor:
    """`linear_surrogate` with the gradients given as one flat vector: <cat(p), G> - stopgrad(same), one
    dot instead of a product and a sum per tensor; its backward writes exactly G's slices into p.grad."""
    if not params:
        return torch.zeros(())
    lin = torch.cat([p.reshape(-1) for p in params]) @ flat_grad.detach().to(params[0].dtype)
    return lin - lin.detach()


@register
class MMPareto(Balancer):
    name = "mmpareto"
    stage = "objective"
    paper = "Wei & Hu, MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance, ICML 2024"
    requires_unimodal_logits = True
    # measured with both gradient spaces: ZeRO-2 fails inside DeepSpeed's gradient reduction (IndexError),
    # ZeRO-3 returns features that are not in the loss's graph
    zero_stages = ()
    zero_stages_reason = ("it takes torch.autograd.grad w.r.t. the features inside the step, which DeepSpeed "
                          "does not support")
    config_class = MMParetoConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.gradient_space not in ("parameter", "feature"):
            raise ValueError(f"balance.gradient_space must be 'parameter' or 'feature', got {self.config.gradient_space!r}")
        if self.config.rescale not in ("encoder", "tensor"):
            raise ValueError(f"balance.rescale must be 'encoder' or 'tensor', got {self.config.rescale!r}")
        if self.config.rescale == "tensor" and self.config.gradient_space == "feature":
            raise ValueError("balance.rescale 'tensor' needs balance.gradient_space 'parameter'")

    def setup(self, ctx, model):
        super().setup(ctx, model)
        unwrapped = ctx.unwrap(model)
        if not callable(getattr(unwrapped, "fuse", None)):
            raise ValueError(f"balance.method 'mmpareto' needs a model with encode/fuse (model.architecture: classifier), "
                             f"got {type(unwrapped).__name__}")
        self._params = {m: [p for _, p in unwrapped.modality_parameters(m) if p.requires_grad] for m in ctx.modalities}

    def _head_loss(self, model, features, labels):
        """L_mm + sum_m L_m recomputed on detached features: its backward reaches only the head."""
        out = self.ctx.unwrap(model).fuse({m: h.detach() for m, h in features.items()})
        return F.cross_entropy(out.logits, labels) + sum(F.cross_entropy(z, labels) for z in out.unimodal_logits.values())

    def loss(self, model, batch, outputs):
        labels, mods = batch["labels"], list(outputs.features)
        feats = [outputs.features[m] for m in mods]
        l_mm = F.cross_entropy(outputs.logits, labels)
        l_uni = {m: F.cross_entropy(outputs.unimodal_logits[m], labels) for m in mods}
        logs = {"loss_mm": l_mm.item(), **{f"loss_{m}": v.item() for m, v in l_uni.items()}}
        c_mm = torch.autograd.grad(l_mm, feats, retain_graph=True)
        c_u = torch.autograd.grad(sum(l_uni.values()), feats, retain_graph=True)
        if self.config.gradient_space == "parameter":
            extra = self._parameter_space(mods, feats, c_mm, c_u, logs)
        else:
            extra = self._feature_space(mods, feats, c_mm, c_u, logs)
        return self._head_loss(model, outputs.features, labels) + extra, logs

    def _parameter_space(self, mods, feats, c_mm, c_u, logs):
        params = [p for m in mods for p in self._params[m]]

        def vjp(cot, retain):
            gs = torch.autograd.grad(feats, params, grad_outputs=cot, retain_graph=retain, allow_unused=True)
            return [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, params)]

        g_mm, g_u = vjp(c_mm, True), vjp(c_u, False)
        # Rule on the global-batch gradients, so every rank integrates identically.
        flat = allreduce_mean_(self.ctx, flatten(g_mm + g_u))  # one copy of both lists
        n = flat.numel() // 2
        if self.config.rescale == "encoder":  # the default: one flat vector per encoder (cheaper, same bits)
            combined, start = [], 0
            for m in mods:
                k = sum(p.numel() for p in self._params[m])
                new, conflict, w = integrate_flat(flat[start:start + k], flat[n + start:n + start + k],
                                                  self.config.gamma)
                combined.append(new)
                start += k
                logs[f"pareto_conflict_{m}"] = float(conflict)
                logs[f"pareto_w_mm_{m}"] = w[0]
            return flat_surrogate(params, torch.cat(combined))
        g_mm, g_u = unflatten(flat[:n], g_mm), unflatten(flat[n:], g_u)
        combined, start = [], 0
        for m in mods:
            k = len(self._params[m])
            new, conflict, w = integrate(g_mm[start:start + k], g_u[start:start + k], self.config.gamma,
                                         per_tensor=self.config.rescale == "tensor")
            combined += new
            start += k
            logs[f"pareto_conflict_{m}"] = float(conflict)
            logs[f"pareto_w_mm_{m}"] = w[0]
        return linear_surrogate(params, combined)

    def _feature_space(self, mods, feats, c_mm, c_u, logs):
        grams = torch.stack([torch.stack([(a * a).sum(), (a * b).sum(), (b * b).sum()]).double()
                             for a, b in zip(c_mm, c_u)])
        grams = self.ctx.reduce_sum(grams)
        extra = 0.0
        for m, h, a, b, (v11, v12, v22) in zip(mods, feats, c_mm, c_u, grams.tolist()):
            w_mm, w_u, conflict = pareto_weights(torch.tensor([[v11, v12], [v12, v22]]))
            new_sq = 4 * (w_mm ** 2 * v11 + 2 * w_mm * w_u * v12 + w_u ** 2 * v22)
            total_sq = v11 + 2 * v12 + v22
            scale = (total_sq / new_sq) ** 0.5 if 0 < new_sq < total_sq else 1.0
            cot = self.config.gamma * scale * 2 * (w_mm * a + w_u * b)
            extra = extra + (h * cot.detach()).sum()
            logs[f"pareto_conflict_{m}"] = float(conflict)
            logs[f"pareto_w_mm_{m}"] = w_mm
        return extra - extra.detach()
