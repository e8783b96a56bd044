"""`AttributionResult`: what every attribution method returns, and the share arithmetic they share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttributionResult:
    """Per-token scores and per-modality shares of one batch.

    * ``scores`` [B, T]: per-token attribution (signed where the method is signed; 0 where not scored).
    * ``token_modality`` [B, T]: index into ``modalities`` per position, -1 for positions that are not scored
      (padding, the answer tokens of an MLLM, a classifier's special tokens).
    * ``modality_share`` {modality: [B]}: non-negative, summing to 1 over the modalities for every sample
      (a sample whose total is 0 gets a uniform share, and ``details["degenerate"]`` flags it).
    * ``target`` / ``baseline``: plain-language statement of the scored quantity and the masking baseline.
    * ``details``: method-specific extras (per-layer attention shares, Shapley values, convergence, ...).
    """

    method: str
    scores: torch.Tensor
    token_modality: torch.Tensor
    modalities: list
    modality_share: dict
    target: str
    baseline: str
    details: dict = field(default_factory=dict)

    def mean_share(self) -> dict:
        return {m: float(v.float().mean()) for m, v in self.modality_share.items()}

    def to_dict(self) -> dict:
        """JSON-ready form (tensors as nested lists)."""
        return {"method": self.method, "target": self.target, "baseline": self.baseline,
                "modalities": list(self.modalities),
                "modality_share": {m: _plain(v) for m, v in self.modality_share.items()},
                "mean_share": self.mean_share(),
                "scores": _plain(self.scores), "token_modality": _plain(self.token_modality),
                "details": _plain(self.details)}


def _plain(x: Any):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and x != x:  # NaN is not JSON
        return None
    return x


def shares_from_totals(totals: torch.Tensor, modalities: list) -> tuple[dict, torch.Tensor]:
    """``totals`` [B, M] of non-negative mass per modality -> ({m: [B]} summing to 1, degenerate [B] bool)."""
    totals = totals.double().clamp_min(0)
    s = totals.sum(1, keepdim=True)
    degenerate = s.squeeze(1) <= 0
    frac = torch.where(s > 0, totals / s.clamp_min(1e-300), torch.full_like(totals, 1.0 / totals.shape[1]))
    return {m: frac[:, i].float() for i, m in enumerate(modalities)}, degenerate


def token_shares(token_scores: torch.Tensor, token_modality: torch.Tensor, modalities: list,
                 absolute: bool = True) -> tuple[dict, torch.Tensor]:
    """R_M = sum_{j in M} |a_j| / sum_j |a_j| over scored positions (token_modality >= 0)."""
    a = token_scores.abs() if absolute else token_scores.clamp_min(0)
    totals = torch.stack([(a * (token_modality == i)).sum(1) for i in range(len(modalities))], 1)
    return shares_from_totals(totals, modalities)


def modality_sums(token_scores: torch.Tensor, token_modality: torch.Tensor, modalities: list) -> dict:
    """Signed per-modality sums {m: [B]} (reported next to the absolute shares)."""
    return {m: (token_scores * (token_modality == i)).sum(1) for i, m in enumerate(modalities)}
