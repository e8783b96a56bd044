"""`mmcosine`: modality-wise cosine similarity logits.

Xu et al., "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained Learning",
ICASSP 2023. Stage: objective.
Follows: GeWu-Lab/MMCosine_ICASSP23@00ba0a9cbd9b866b5017e972a1266d7b664bf86e:main_CD.py and
models/fusion_modules.py (CREMA-D setting).

Each modality's logits are a scaled cosine between its feature and the per-class rows of its column block
of the concat classifier: z_m[k] = s * <h_m / |h_m|, W[k, S_m] / |W[k, S_m]|>, no bias, and z = sum_m z_m;
the loss is CE(z). Normalising both sides removes the dominant modality's advantage in feature and weight
norm, so every modality's logits live on the same [-s, s] scale.

Requires `model.fusion: concat` (the column blocks S_m only exist there); any other fusion is an error.

Defaults: scale s = 10 (the paper's default; the reference toolkit uses 15).

How it fits the model contract: the cosine head must also be what evaluation, Shapley values, checkpoint
choice and the final test see, so the method replaces the model's concat head *instance* at build time
(`build_model`) with `CosineConcatFusion`, a subclass of the concat head that uses the same parameters
(the weight is reused, the bias is zeroed and frozen). The classifier class is unchanged and the saved
weights load into a plain concat model; to get the cosine predictions back from a saved model, call
`apply_cosine_head(model, scale)` (the scale is also stored as `config.mmcosine_scale`).

M > 2: supported (the cosine logits are summed over any number of modalities; the reference toolkit
handles M = 2 and 3).

Differences from the official code: none in the logits (scaled cosines of each modality's feature and its
weight block, no bias); the official concat head keeps a bias parameter that the cosine path never uses,
here it is zeroed and frozen so that the saved model's plain concat forward has no stray bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp
from mmbalance_llm.models.fusion import ConcatFusion


@dataclass
class MMCosineConfig(BalancerConfig):
    scale: float = hp(10.0, "Logit scale s applied to the cosine similarities (paper: 10; toolkit: 15).", min=0.0, min_exclusive=True)


class CosineConcatFusion(ConcatFusion):
    """Concat head whose per-modality logits are scaled cosines (no bias); sum_m z_m == z still holds."""

    def __init__(self, modalities, feature_dim: int, num_classes: int, scale: float):
        super().__init__(modalities, feature_dim, num_classes)
        self.scale = float(scale)

    def unimodal(self, m: str, h: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.classifier.weight[:, self.column_slice(m)], dim=1)
        return self.scale * F.normalize(h, dim=1) @ w.t()

    def forward(self, features: dict):
        uni = {m: self.unimodal(m, features[m]) for m in self.modalities}
        return torch.stack(list(uni.values())).sum(0), uni


def apply_cosine_head(model, scale: float):
    """Swap a MultimodalClassifier's concat head for the cosine head, in place (same parameters)."""
    fusion = getattr(model, "fusion", None)
    if not isinstance(fusion, ConcatFusion):
        raise ValueError("balance.method 'mmcosine' requires model.fusion: concat "
                         f"(got {getattr(getattr(model, 'config', None), 'fusion', type(fusion).__name__)!r})")
    if scale <= 0:
        raise ValueError(f"balance.scale must be > 0, got {scale}")
    cosine = CosineConcatFusion(fusion.modalities, fusion.feature_dim, fusion.classifier.out_features, scale)
    cosine.classifier = fusion.classifier
    with torch.no_grad():
        cosine.classifier.bias.zero_()
    cosine.classifier.bias.requires_grad_(False)  # unused: frozen, so DDP sees no unused parameter
    model.fusion = cosine
    model.config.mmcosine_scale = float(scale)
    return model


@register
class MMCosine(Balancer):
    name = "mmcosine"
    stage = "objective"
    paper = "Xu et al., MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained Learning, ICASSP 2023"
    requires_unimodal_logits = True
    config_class = MMCosineConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.scale <= 0:
            raise ValueError(f"balance.scale must be > 0, got {self.config.scale}")

    def build_model(self, model_cfg, modalities, input_shapes, num_classes):
        if model_cfg.fusion != "concat":
            raise ValueError(f"balance.method 'mmcosine' requires model.fusion: concat (got {model_cfg.fusion!r})")
        model = super().build_model(model_cfg, modalities, input_shapes, num_classes)
        return apply_cosine_head(model, self.config.scale)
