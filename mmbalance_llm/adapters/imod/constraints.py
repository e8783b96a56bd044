"""IMoD's partition of LoRA's ``A`` and its two gradient-level constraints, as plain tensor functions.

Notation (Zhang et al., "Parameter-Efficient Adaptation for MLLMs via Implicit Modality Decomposition", CVPR 2026;
equation numbers of the paper): ``A`` is LoRA's ``r x d`` down-projection, split element-wise by three disjoint
0/1 masks ``A = M_t*A + M_o*A + M_s*A`` (text-exclusive, non-text-exclusive, shared; Eq. 1), stored here as one
``uint8`` code per element (:data:`TEXT`, :data:`NON_TEXT`, :data:`SHARED`).

* **MSDC** (decoupling): ``L_TS = ||(A*(M_t+M_s)) X_t - A X_t||^2`` on the text tokens ``X_t`` and the mirror
  ``L_OS`` on the non-text tokens. Since ``A*(M_t+M_s) - A = -A*M_o``, ``L_TS = ||(A*M_o) X_t||^2``: the
  non-text-exclusive elements must not respond to text, and the text-exclusive ones not to media.
* **MAAC** (alignment): the shared block's token features ``s = (A*M_s) x``, their per-sequence means
  ``m_t, m_o`` and concentrations ``c = mean_i cos(s_i, m)`` give ``L_MA = 1 - (c_t + c_o) cos(m_t, m_o)``.

Both are functions of ``A`` with the layer input held fixed, and IMoD adds only their gradients w.r.t. ``A`` to
the task gradient (``G_A = grad L_task + l1 (grad L_TS + grad L_OS) + l2 grad L_MA``). The gradients are written
out in closed form here (checked against autograd in tests/test_imod.py), so a layer can compute them during its
forward under ``no_grad``: nothing extra is kept for backward, and gradient checkpointing's recomputation is
unaffected.

Normalisation (not stated in the paper, which writes a squared norm): ``L_TS`` / ``L_OS`` are the squared norms
*averaged over the batch's text / non-text tokens*; ``L_MA`` is averaged over the sequences that have both text
and non-text tokens. Padding is in neither token set.
"""
from __future__ import annotations

import zlib

import torch

TEXT, NON_TEXT, SHARED = 0, 1, 2


def layer_shared_ratio(shared_ratio: float, growth: float, layer: int, num_layers: int) -> float:
    """``r_s^(l) = r_s^(0) + alpha * l / L``: the shared share of layer ``l`` (0-based) of ``L``."""
    return shared_ratio + growth * layer / max(num_layers, 1)


def make_partition(r: int, d: int, shared: float, text_share: float, seed: int, key: str) -> torch.Tensor:
    """``uint8 [r, d]`` element codes, randomly interleaved (not blocks): ``round(shared * r * d)`` shared
    elements, ``text_share`` of the rest text-exclusive, the others non-text-exclusive. Drawn from a generator
    seeded by ``seed`` and the module name, so it is reproducible and leaves the global RNG (LoRA's init)
    untouched."""
    n = r * d
    n_s = min(n, max(0, round(shared * n)))
    n_t = round((n - n_s) * text_share)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    perm = torch.randperm(n, generator=g)
    codes = torch.full((n,), SHARED, dtype=torch.uint8)
    codes[perm[:n_t]] = TEXT
    codes[perm[n_t:n - n_s]] = NON_TEXT
    return codes.view(r, d)


def decouple(A: torch.Tensor, codes: torch.Tensor, x: torch.Tensor, text: torch.Tensor, other: torch.Tensor):
    """MSDC: ``(L_TS + L_OS, d(L_TS + L_OS)/dA)`` for ``A [r,d]``, tokens ``x [N,d]`` and bool token masks [N]."""
    value = x.new_zeros(())
    grad = torch.zeros_like(A)
    for rows, code in ((text, NON_TEXT), (other, TEXT)):  # text tokens vs M_o, media tokens vs M_t
        n = int(rows.sum())
        if n == 0:
            continue
        m = (codes == code).to(A.dtype)
        xs = x[rows]
        z = xs @ (A * m).T  # [n, r] = the masked block's response
        value = value + (z * z).sum() / n
        grad = grad + (2.0 / n) * (z.T @ xs) * m
    return value, grad


def _cos_parts(u: torch.Tensor, v: torch.Tensor, eps: float):
    """cos(u, v) over the last dim and its partial derivatives w.r.t. u and v (norms clamped at eps)."""
    nu = u.norm(dim=-1, keepdim=True).clamp_min(eps)
    nv = v.norm(dim=-1, keepdim=True).clamp_min(eps)
    cos = (u * v).sum(-1, keepdim=True) / (nu * nv)
    du = v / (nu * nv) - cos * u / nu**2
    dv = u / (nu * nv) - cos * v / nv**2
    return cos, du, dv


def align_features(s: torch.Tensor, text: torch.Tensor, other: torch.Tensor, eps: float = 1e-8):
    """MAAC on the shared block's features ``s [B,T,r]``: ``(L_MA, dL_MA/ds)``, averaged over the sequences with
    both text and non-text tokens (zero when there are none)."""
    nt = text.sum(1, keepdim=True).to(s.dtype)  # [B,1]
    no = other.sum(1, keepdim=True).to(s.dtype)
    both = ((nt > 0) & (no > 0)).squeeze(1)
    nb = int(both.sum())
    ds = torch.zeros_like(s)
    if nb == 0:
        return s.new_zeros(()), ds
    s, nt, no = s[both], nt[both], no[both]
    tm, om = text[both][..., None].to(s.dtype), other[both][..., None].to(s.dtype)
    m_t = (s * tm).sum(1) / nt  # [b, r] sequence means
    m_o = (s * om).sum(1) / no
    cos_t, du_t, dv_t = _cos_parts(s, m_t[:, None], eps)  # token-to-mean cosines [b,T,1], [b,T,r]
    cos_o, du_o, dv_o = _cos_parts(s, m_o[:, None], eps)
    c_t = (cos_t * tm).sum(1) / nt  # [b, 1] concentrations
    c_o = (cos_o * om).sum(1) / no
    big_c, dc_mt, dc_mo = _cos_parts(m_t, m_o, eps)  # [b,1], [b,r], [b,r]
    loss = 1 - (c_t + c_o) * big_c
    # d c_t / d s_k = du_t[k]/n_t (k in text) + (sum_i dv_t[i]) / n_t^2 (through the mean); likewise c_o
    dct = du_t * tm / nt[:, None] + ((dv_t * tm).sum(1) / nt**2)[:, None] * tm
    dco = du_o * om / no[:, None] + ((dv_o * om).sum(1) / no**2)[:, None] * om
    dC = (dc_mt / nt)[:, None] * tm + (dc_mo / no)[:, None] * om
    ds[both] = -(big_c[:, None] * (dct + dco) + (c_t + c_o)[:, None] * dC) / nb
    return loss.mean(), ds


def align(A: torch.Tensor, codes: torch.Tensor, x: torch.Tensor, text: torch.Tensor, other: torch.Tensor,
          eps: float = 1e-8):
    """MAAC: ``(L_MA, dL_MA/dA)`` for ``A [r,d]``, hidden states ``x [B,T,d]`` and bool masks ``[B,T]``."""
    ms = (codes == SHARED).to(A.dtype)
    value, ds = align_features(x @ (A * ms).T, text, other, eps)
    return value, (ds.flatten(0, 1).T @ x.flatten(0, 1)) * ms


def constraint_grads(A: torch.Tensor, codes: torch.Tensor, x: torch.Tensor, text: torch.Tensor,
                     other: torch.Tensor, l1: float, l2: float):
    """Both constraints at once, as a layer needs them: ``(L_TS + L_OS, L_MA, l1 dMSDC/dA + l2 dMAAC/dA)``.

    Equal to :func:`decouple` and :func:`align` (tests/test_imod.py), with the three masked blocks stacked so the
    whole thing is two matmuls of ``3r`` rows: one for the block responses, one for their gradient."""
    r = A.shape[0]
    masks = [(codes == c).to(A.dtype) for c in (NON_TEXT, TEXT, SHARED)]  # M_o meets text, M_t meets media
    xf = x.flatten(0, 1)
    z = xf @ torch.cat([A * m for m in masks]).T  # [N, 3r]
    dz = torch.zeros_like(z)
    v_dec = v_ali = z.new_zeros(())
    if l1:
        for i, rows in enumerate((text.flatten(), other.flatten())):
            n = int(rows.sum())
            if n:
                zi = z[:, i * r:(i + 1) * r] * rows[:, None]
                v_dec = v_dec + (zi * zi).sum() / n
                dz[:, i * r:(i + 1) * r] = (2.0 * l1 / n) * zi
    if l2:
        v_ali, ds = align_features(z[:, 2 * r:].view(*x.shape[:2], r), text, other)
        dz[:, 2 * r:] = l2 * ds.flatten(0, 1)
    g = dz.T @ xf  # [3r, d]
    grad = sum(g[i * r:(i + 1) * r] * m for i, m in enumerate(masks))
    return v_dec, v_ali, grad
