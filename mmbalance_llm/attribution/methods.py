"""The attribution methods, written once against the adapter interface (classifier or HF MLLM).

Every method returns an :class:`AttributionResult`. Formulas: docs/attribution.md.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from mmbalance_llm.attribution.result import AttributionResult, modality_sums, shares_from_totals, token_shares
from mmbalance_llm.attribution.shapley import exact_shapley, sampled_shapley
from mmbalance_llm.eval.metrics import shapley_values, subsets


@contextmanager
def frozen(model):
    """Parameters stop requiring grad (attribution needs input gradients only: the backward then skips every
    weight gradient), and the model is in eval mode; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _spread(values: torch.Tensor, token_modality: torch.Tensor) -> torch.Tensor:
    """Per-modality values [B, M] -> per-token scores [B, T] (each token gets value / token count)."""
    out = torch.zeros(token_modality.shape, dtype=torch.float32)
    for i in range(values.shape[1]):
        pos = token_modality == i
        n = pos.sum(1, keepdim=True).clamp_min(1)
        out += pos * (values[:, i:i + 1].float().cpu() / n)
    return out


def grad_x_input(ad, **_):
    leaves = {k: v.requires_grad_(True) for k, v in ad.leaves().items()}
    with torch.enable_grad():
        score, _ = ad.score(leaves)
        grads = torch.autograd.grad(score.sum(), list(leaves.values()))
    prod = {k: leaves[k].detach() * g for k, g in zip(leaves, grads)}
    a = ad.reduce_tokens(prod).float().cpu()
    a = a * (ad.token_modality >= 0)
    share, deg = token_shares(a, ad.token_modality, ad.modalities)
    return AttributionResult("grad_x_input", a, ad.token_modality, ad.modalities, share, ad.target_desc,
                             "none (local gradient at the input)",
                             {"signed": modality_sums(a, ad.token_modality, ad.modalities), "degenerate": deg,
                              "score": score.detach().cpu()})


def integrated_gradients(ad, steps: int = 16, baseline: str = "zero", internal_batch_size: int = 256, **_):
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = ad.leaves()
    base = ad.baseline_leaves(baseline)
    B = ad.B
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # midpoint Riemann sum
    # two extra rows per sample (alpha 0 and 1) give f(baseline) and f(input) for the completeness check
    rows_idx = torch.arange(B).repeat_interleave(steps + 2)
    rows_alpha = torch.cat([alphas, torch.tensor([0.0, 1.0])]).repeat(B)
    is_path = torch.cat([torch.ones(steps), torch.zeros(2)]).repeat(B).bool()
    dev = next(iter(x.values())).device
    total = {k: torch.zeros_like(v) for k, v in x.items()}
    ends = torch.zeros(B, 2, dtype=torch.float64)
    for s in range(0, len(rows_idx), internal_batch_size):
        sl = slice(s, s + internal_batch_size)
        idx, al, path = rows_idx[sl].to(dev), rows_alpha[sl].to(dev), is_path[sl].to(dev)
        pts = {k: v.detach().requires_grad_(True) for k, v in ad.interpolate(x, base, al, idx).items()}
        with torch.enable_grad():
            f, _ = ad.score(pts, idx)
            grads = torch.autograd.grad((f * path).sum(), list(pts.values()))
        for k, g in zip(pts, grads):
            total[k].index_add_(0, idx, g)
        end = ~path.cpu()
        ends[rows_idx[sl][end], (rows_alpha[sl][end] > 0.5).long()] = f.detach().double().cpu()[end]
    f_b, f_x = ends[:, 0], ends[:, 1]
    prod = {k: (x[k] - base[k]) * total[k] / steps for k in x}
    a = ad.reduce_tokens(prod).float().cpu() * (ad.token_modality >= 0)
    gap = (ad.reduce_tokens(prod).float().cpu().sum(1) - (f_x - f_b).float())
    share, deg = token_shares(a, ad.token_modality, ad.modalities)
    return AttributionResult("integrated_gradients", a, ad.token_modality, ad.modalities, share, ad.target_desc,
                             f"{baseline} baseline, {steps} midpoint steps",
                             {"signed": modality_sums(a, ad.token_modality, ad.modalities), "degenerate": deg,
                              "completeness_gap": gap, "f_input": f_x.float(), "f_baseline": f_b.float()})


def shapley_modality(ad, **_):
    mods = list(ad.modalities)
    if len(mods) > 10:
        raise ValueError(f"exact modality Shapley over {len(mods)} modalities needs 2^{len(mods)} passes")
    value = {}
    with torch.no_grad():
        for s in subsets(mods):
            value[s] = ad.score_blank(removed=tuple(m for m in mods if m not in s))[0].double().cpu()
    phi = shapley_values(value, mods)
    phis = torch.stack([phi[m] for m in mods], 1)
    share, deg = shares_from_totals(phis.abs(), mods)
    full, empty = value[frozenset(mods)], value[frozenset()]
    return AttributionResult("shapley_modality", _spread(phis, ad.token_modality), ad.token_modality, mods, share,
                             ad.target_desc, f"exact over all {2 ** len(mods)} subsets; removed = {ad.blank_desc}",
                             {"phi": {m: phi[m].float() for m in mods}, "v_full": full.float(), "v_empty": empty.float(),
                              "passes": 2 ** len(mods), "degenerate": deg})


def _groups(ad, b: int, n_groups: int) -> list:
    """Players of sample b: (modality index, LongTensor of positions), contiguous chunks per modality."""
    tm = ad.token_modality[b]
    sink = getattr(ad, "first_pos", None)
    players = []
    for i in range(len(ad.modalities)):
        pos = (tm == i).nonzero().squeeze(1)
        if sink is not None:  # the first token (BOS / attention sink) stays present, as MM-SHAP keeps BOS
            pos = pos[pos != int(sink[b])]
        for chunk in torch.tensor_split(pos, min(n_groups, len(pos))) if len(pos) else []:
            players.append((i, chunk))
    return players


def shapley_tokens(ad, n_groups: int = 8, n_permutations: int = 32, exact: bool = False, seed: int = 0, **_):
    """MM-SHAP: Shapley values of token groups (each modality's prompt positions cut into ``n_groups`` contiguous
    chunks), sampled by antithetic permutations (or ``exact`` enumeration); share of M = sum |phi| over its groups."""
    B, T = ad.token_modality.shape
    scores = torch.zeros(B, T)
    totals = torch.zeros(B, len(ad.modalities), dtype=torch.float64)
    conv = []
    g = torch.Generator().manual_seed(seed)
    for b in range(B):
        players = _groups(ad, b, n_groups)
        P = len(players)
        if P == 0:
            conv.append({"players": 0})
            continue
        member = torch.zeros(P, T, dtype=torch.bool)
        for j, (_, pos) in enumerate(players):
            member[j, pos] = True
        scored = member.any(0)

        def value_fn(coal, b=b, member=member, scored=scored):
            keep = ~scored.unsqueeze(0).expand(len(coal), -1).clone()
            keep |= (coal.unsqueeze(-1) & member.unsqueeze(0)).any(1)
            with torch.no_grad():
                return ad.score_masked(keep, torch.full((len(coal),), b, dtype=torch.long))[0].double().cpu()

        if exact:
            phi = exact_shapley(value_fn, P)
            info = {"players": P, "exact": True, "evaluations": 2 ** P}
        else:
            phi, info = sampled_shapley(value_fn, P, n_permutations, g)
            info = {"players": P, "exact": False, **info,
                    "max_stderr": float(info["stderr"].max()) if P else 0.0,
                    "trace_share": {k: _group_share(v, players, len(ad.modalities)) for k, v in info["trace"].items()}}
        for j, (i, pos) in enumerate(players):
            scores[b, pos] = float(phi[j]) / len(pos)
            totals[b, i] += abs(float(phi[j]))
        info["phi"] = phi.float()
        info["group_modality"] = [ad.modalities[i] for i, _ in players]
        conv.append(info)
    share, deg = shares_from_totals(totals, ad.modalities)
    how = "exact enumeration" if exact else f"{n_permutations} antithetic permutations"
    return AttributionResult("shapley_tokens", scores, ad.token_modality, ad.modalities, share, ad.target_desc,
                             f"MM-SHAP over token groups ({how}); masked = {ad.mask_desc}",
                             {"per_sample": conv, "degenerate": deg, "n_groups": n_groups})


def _group_share(phi, players, M):
    tot = [0.0] * M
    for j, (i, _) in enumerate(players):
        tot[i] += abs(float(phi[j]))
    s = sum(tot)
    return [t / s if s > 0 else 1.0 / M for t in tot]


def ablation(ad, **_):
    mods = list(ad.modalities)
    with torch.no_grad():
        full, pred = ad.score_blank(())
        blank, drop, flip_b, flip_d = {}, {}, {}, {}
        for m in mods:
            s, p = ad.score_blank((m,))
            blank[m], flip_b[m] = (full - s).float().cpu(), (p != pred).cpu()
            r = ad.score_drop(m)
            drop[m] = None if r is None else (full - r[0]).float().cpu()
            flip_d[m] = None if r is None else (r[1] != pred).cpu()
    deltas = torch.stack([blank[m] for m in mods], 1)
    share, deg = shares_from_totals(deltas.abs(), mods)
    return AttributionResult("ablation", _spread(deltas, ad.token_modality), ad.token_modality, mods, share,
                             ad.target_desc, f"blank = {ad.blank_desc}; drop = {ad.drop_desc}",
                             {"delta_logp_blank": blank, "delta_logp_drop": drop, "flip_blank": flip_b,
                              "flip_drop": flip_d, "score_full": full.float().cpu(), "degenerate": deg})


def attention(ad, **_):
    rows, kmod, sink = ad.attention()  # rows [L, B, H, K]
    rows = rows.float().cpu()
    kmod, sink = kmod.cpu(), sink.cpu()
    L, B, H, K = rows.shape
    mods = ad.modalities
    counts = torch.stack([(kmod == i).sum(1) for i in range(len(mods))], 1).float()  # [B, M]
    variants = {}
    for no_sink in (False, True):
        A = rows.clone()
        cnt = counts.clone()
        if no_sink:
            A[:, torch.arange(B), :, sink] = 0.0
            for b in range(B):
                i = int(kmod[b, sink[b]])
                if i >= 0:
                    cnt[b, i] -= 1
        denom = A.sum(-1, keepdim=True).clamp_min(1e-12)
        raw = torch.stack([(A * (kmod == i).view(1, B, 1, K)).sum(-1) for i in range(len(mods))], -1) / denom
        per_tok = raw / cnt.clamp_min(1).view(1, B, 1, -1)
        norm = per_tok / per_tok.sum(-1, keepdim=True).clamp_min(1e-12)
        tag = "_no_sink" if no_sink else ""
        variants["raw" + tag] = raw        # [L, B, H, M]
        variants["normalised" + tag] = norm
    mean_raw = variants["raw_no_sink"].mean((0, 2))  # [B, M]
    share, deg = shares_from_totals(mean_raw, mods)
    key_scores = rows.mean((0, 2))  # [B, K]
    tok = ad.attention_token_map(kmod, key_scores).float().cpu()
    per_layer = {v: {m: t.mean(2)[:, :, i].transpose(0, 1) for i, m in enumerate(mods)} for v, t in variants.items()}
    per_head = {v: {m: t[..., i].permute(1, 0, 2) for i, m in enumerate(mods)} for v, t in variants.items()}
    return AttributionResult("attention", tok, ad.token_modality, mods, share, ad.target_desc,
                             "none; share = head/layer mean of the raw share without the sink key, renormalised",
                             {"per_layer": per_layer, "per_head": per_head, "token_counts": counts,
                              "layers": L, "heads": H, "degenerate": deg})


METHODS = {"attention": attention, "grad_x_input": grad_x_input, "integrated_gradients": integrated_gradients,
           "shapley_modality": shapley_modality, "shapley_tokens": shapley_tokens, "ablation": ablation}
