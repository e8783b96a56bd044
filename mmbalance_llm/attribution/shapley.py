"""Shapley values over token groups: exact enumeration and permutation sampling with a convergence estimate.

``value_fn(coalitions: BoolTensor[N, P]) -> Tensor[N]`` evaluates the target with only the players marked
True present. Permutation sampling (Castro et al. 2009) uses antithetic pairs (a permutation and its
reverse), which cancels much of the variance for near-additive games; every permutation costs P + 1
evaluations, batched.
"""
from __future__ import annotations

import itertools
import math

import torch


def exact_shapley(value_fn, P: int, chunk: int = 512) -> torch.Tensor:
    """phi [P] by enumerating all 2^P coalitions (P <= 16)."""
    if P > 16:
        raise ValueError(f"exact Shapley over {P} players needs 2^{P} passes; use sampling (P <= 16)")
    masks = torch.tensor(list(itertools.product([False, True], repeat=P)), dtype=torch.bool).reshape(-1, P)
    vals = torch.cat([value_fn(masks[i:i + chunk]) for i in range(0, len(masks), chunk)]).double()
    code = (masks.long() * (1 << torch.arange(P - 1, -1, -1))).sum(1)
    v = torch.empty(1 << P, dtype=torch.float64)
    v[code] = vals
    sizes = masks.sum(1)
    w = torch.tensor([math.factorial(s) * math.factorial(P - s - 1) / math.factorial(P) if s < P else 0.0
                      for s in range(P + 1)], dtype=torch.float64)
    phi = torch.zeros(P, dtype=torch.float64)
    for j in range(P):
        bit = 1 << (P - 1 - j)
        without = ~masks[:, j]
        phi[j] = (w[sizes[without]] * (v[code[without] | bit] - v[code[without]])).sum()
    return phi


def sampled_shapley(value_fn, P: int, n_permutations: int = 32, generator: torch.Generator | None = None,
                    chunk: int = 512) -> tuple[torch.Tensor, dict]:
    """phi [P] from ``n_permutations`` random permutations (rounded up to antithetic pairs).

    Returns (phi, convergence) with ``stderr`` [P] (standard error of each phi from the spread of the per-pair
    marginal contributions), ``n_permutations``, ``evaluations`` and ``trace``: the estimate after 1/4, 1/2
    and all of the pairs, so a caller can see whether it has settled."""
    g = generator or torch.Generator().manual_seed(0)
    pairs = max(1, (n_permutations + 1) // 2)
    perms = []
    for _ in range(pairs):
        p = torch.randperm(P, generator=g)
        perms += [p, p.flip(0)]
    rows = []
    for p in perms:  # prefixes of the permutation: sizes 0..P
        m = torch.zeros(P + 1, P, dtype=torch.bool)
        for k in range(1, P + 1):
            m[k] = m[k - 1]
            m[k, p[k - 1]] = True
        rows.append(m)
    masks = torch.cat(rows)
    vals = torch.cat([value_fn(masks[i:i + chunk]) for i in range(0, len(masks), chunk)]).double()
    vals = vals.view(len(perms), P + 1)
    contrib = torch.zeros(len(perms), P, dtype=torch.float64)
    for r, p in enumerate(perms):
        contrib[r, p] = vals[r, 1:] - vals[r, :-1]
    per_pair = contrib.view(pairs, 2, P).mean(1)  # antithetic pairs are the independent samples
    phi = per_pair.mean(0)
    stderr = per_pair.std(0, unbiased=True) / math.sqrt(pairs) if pairs > 1 else torch.full((P,), float("nan"))
    trace = {}
    for frac in (0.25, 0.5, 1.0):
        k = max(1, int(round(pairs * frac)))
        trace[k * 2] = per_pair[:k].mean(0)
    return phi, {"stderr": stderr, "n_permutations": 2 * pairs, "evaluations": int(len(masks)), "trace": trace}
