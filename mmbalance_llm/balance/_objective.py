"""Helpers shared by the objective-stage methods (MMPareto, LFM, GBlending, UMT): two-task min-norm
weights, cross-process averaging of flat gradient vectors, and the "linear surrogate" that lets a
method hand the trainer an arbitrary encoder gradient through an ordinary `accelerator.backward`.

Not auto-imported by the registry (leading underscore); methods import it explicitly.
"""
from __future__ import annotations

import torch


def min_norm_weights(gram: torch.Tensor) -> tuple[float, float]:
    """argmin_{a in [0,1]} ||a g1 + (1-a) g2||^2 from the Gram matrix [[g1.g1, g1.g2], [g1.g2, g2.g2]]
    (MGDA's closed form for two tasks). Returns (a, 1 - a)."""
    v11, v12, v22 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    denom = v11 + v22 - 2 * v12
    if denom <= 1e-20:  # identical gradients: any convex weight gives the same vector
        return 0.5, 0.5
    a = min(1.0, max(0.0, (v22 - v12) / denom))
    return a, 1.0 - a


def pareto_weights(gram: torch.Tensor) -> tuple[float, float, bool]:
    """MMPareto's rule: (1/2, 1/2) when cos(g_mm, g_m) > 0, else the min-norm (MGDA) weights.
    Returns (w_mm, w_m, conflict)."""
    v11, v12, v22 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    cos = v12 / max((v11 * v22) ** 0.5, 1e-30)
    if cos > 0:
        return 0.5, 0.5, False
    a, b = min_norm_weights(gram)
    return a, b, True


def world_size(ctx) -> int:
    return 1 if ctx is None else ctx.accelerator.num_processes


def allreduce_mean_(ctx, flat: torch.Tensor) -> torch.Tensor:
    """Average a flat tensor over processes in place (a statistic every rank must agree on)."""
    n = world_size(ctx)
    if n > 1:
        import torch.distributed as dist

        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
    return flat


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def unflatten(flat: torch.Tensor, like) -> list:
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def linear_surrogate(params, grads) -> torch.Tensor:
    """A zero-valued term whose gradient w.r.t. each p is exactly the given (detached) tensor:
    sum_p <p, G_p> - stopgrad(same). Adding it to a loss routes G_p into p.grad through the normal
    backward, so DDP all-reduces it and gradient accumulation scales it like any other gradient."""
    terms = [(p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads)]
    if not terms:
        return torch.zeros(())
    lin = torch.stack(terms).sum()
    return lin - lin.detach()


def accumulate_grads(ctx, params) -> None:
    """All-reduce (mean) p.grad of a model that is not wrapped by DDP (method-internal clones)."""
    if world_size(ctx) == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = allreduce_mean_(ctx, flatten(grads))
    for p, g in zip(params, unflatten(flat, grads)):
        p.grad = g.clone()
