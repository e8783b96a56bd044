"""Fusion heads: {modality: h_m [B, d]} -> fused logits z [B, C] and, when the head is linear in each
h_m, unimodal logits z_m with sum_m z_m == z (the bias is split evenly)."""
from __future__ import annotations

import torch
from torch import nn


class ConcatFusion(nn.Module):
    """z = W [h_1; ...; h_M] + b; z_m = W[:, S_m] h_m + b / M."""

    has_unimodal_logits = True

    def __init__(self, modalities, feature_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim * len(self.modalities), num_classes)

    def column_slice(self, m: str) -> slice:
        i = self.modalities.index(m)
        return slice(i * self.feature_dim, (i + 1) * self.feature_dim)

    def unimodal(self, m: str, h: torch.Tensor) -> torch.Tensor:
        w = self.classifier.weight[:, self.column_slice(m)]
        return h @ w.t() + self.classifier.bias / len(self.modalities)

    def fused_logits(self, features: dict) -> torch.Tensor:
        """z alone (the Shapley subset passes need no unimodal logits)."""
        return self.classifier(torch.cat([features[m] for m in self.modalities], dim=1))

    def forward(self, features: dict):
        return self.fused_logits(features), {m: self.unimodal(m, features[m]) for m in self.modalities}


class SumFusion(nn.Module):
    """z = W (sum_m h_m) + b; linear, so z_m = W h_m + b / M."""

    has_unimodal_logits = True

    def __init__(self, modalities, feature_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def unimodal(self, m: str, h: torch.Tensor) -> torch.Tensor:
        return h @ self.classifier.weight.t() + self.classifier.bias / len(self.modalities)

    def fused_logits(self, features: dict) -> torch.Tensor:
        return self.classifier(torch.stack([features[m] for m in self.modalities]).sum(0))

    def forward(self, features: dict):
        return self.fused_logits(features), {m: self.unimodal(m, features[m]) for m in self.modalities}


class FiLMFusion(nn.Module):
    """The first modality is modulated by the others: h = h_1 * (1 + sum gamma_m(h_m)) + sum beta_m(h_m).

    Nonlinear in the features, so there are no split unimodal logits (probe them instead). For M = 1
    it reduces to a linear head.
    """

    has_unimodal_logits = False

    def __init__(self, modalities, feature_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.film = nn.ModuleDict({m: nn.Linear(feature_dim, 2 * feature_dim) for m in self.modalities[1:]})
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, features: dict):
        h = features[self.modalities[0]]
        scale, shift = torch.zeros_like(h), torch.zeros_like(h)
        for m, layer in self.film.items():
            gamma, beta = layer(features[m]).chunk(2, dim=-1)
            scale, shift = scale + gamma, shift + beta
        return self.classifier(h * (1 + scale) + shift), None


class GatedFusion(nn.Module):
    """Per-sample softmax gates over modalities: z = W sum_m g_m(h) h_m + b. No split unimodal logits."""

    has_unimodal_logits = False

    def __init__(self, modalities, feature_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.gate = nn.Linear(feature_dim * len(self.modalities), len(self.modalities))
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, features: dict):
        stacked = torch.stack([features[m] for m in self.modalities], dim=1)  # [B, M, d]
        gates = torch.softmax(self.gate(stacked.flatten(1)), dim=-1)
        return self.classifier((gates.unsqueeze(-1) * stacked).sum(1)), None


FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}


def build_fusion(kind: str, modalities, feature_dim: int, num_classes: int) -> nn.Module:
    if kind not in FUSIONS:
        raise ValueError(f"unknown fusion {kind!r}; choose one of {', '.join(FUSIONS)}")
    return FUSIONS[kind](modalities, feature_dim, num_classes)

