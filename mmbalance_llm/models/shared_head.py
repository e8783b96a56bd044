"""`SharedHeadClassifier`: per-modality encoders and ONE linear head shared by every modality (the MLA
architecture, Zhang et al., CVPR 2024), as a `transformers.PreTrainedModel`.

- `forward(**inputs)` (all modalities): z_m = head(h_m) for every m, fused with entropy gates
  w_m = softmax_m(-H(softmax z_m)) per sample (MLA's test-time fusion: a confident modality weighs
  more). `unimodal_logits[m] = w_m * z_m`, so they sum to the fused logits and their argmax is head(h_m)'s.
- `forward(modality=m, **{m: x_m})`: only encoder m and the head run; logits = head(h_m). This is the
  unimodal step of MLA's alternating training and works through DDP (other encoders are unused).

Built from the same recipe `model` section as the classifier (architecture name `shared_head`); the
`fusion` key is ignored. `AutoModel.from_pretrained(dir)` restores it once the toolkit is imported.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig
from mmbalance_llm.models.encoders import build_encoder
from mmbalance_llm.models.outputs import MultimodalOutput
from mmbalance_llm.models.registry import register_architecture
from mmbalance_llm.models.common import register_auto, keep_native_weight_names


class SharedHeadConfig(MultimodalClassifierConfig):
    model_type = "mmbalance_shared_head"

    def __init__(self, **kwargs):
        kwargs["fusion"] = "shared_head"
        super().__init__(**kwargs)


def entropy_gates(logits: list) -> torch.Tensor:
    """[B, M] weights w_m = exp(-H_m) / sum_k exp(-H_k), H_m the entropy of softmax(z_m)."""
    ent = []
    for z in logits:
        logp = torch.log_softmax(z.float(), dim=-1)
        ent.append(-(logp.exp() * logp).sum(-1))
    return torch.softmax(-torch.stack(ent, dim=1), dim=1)


class SharedHeadFusion(nn.Module):
    has_unimodal_logits = True

    def __init__(self, modalities, feature_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.head = nn.Linear(feature_dim, num_classes)

    def unimodal(self, m: str, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def forward(self, features: dict):
        z = [self.head(features[m]) for m in self.modalities]
        w = entropy_gates(z).to(z[0].dtype)
        weighted = {m: w[:, j:j + 1] * z[j] for j, m in enumerate(self.modalities)}
        return sum(weighted.values()), weighted


class SharedHeadClassifier(MultimodalClassifier):
    config_class = SharedHeadConfig

    def __init__(self, config: SharedHeadConfig):
        PreTrainedModel.__init__(self, config)
        if not config.modalities:
            raise ValueError("SharedHeadConfig.modalities is empty")
        missing = [m for m in config.modalities if m not in config.input_shapes]
        if missing:
            raise ValueError(f"SharedHeadConfig.input_shapes has no shape for {missing}")
        self.modalities = list(config.modalities)
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            settings = config.encoder_settings(m)
            self.encoders[m] = build_encoder(settings["encoder"], config.input_shapes[m], settings)
        self.fusion = SharedHeadFusion(self.modalities, config.feature_dim, config.num_classes)
        self.post_init()
        keep_native_weight_names(self)

    @property
    def head(self) -> nn.Linear:
        return self.fusion.head

    def forward(self, labels: Optional[torch.Tensor] = None, modality: Optional[str] = None, **inputs):
        if modality is None:
            return super().forward(labels=labels, **inputs)
        if modality not in self.encoders:
            raise KeyError(f"unknown modality {modality!r}; modalities are {self.modalities}")
        h = self.encoders[modality](inputs[modality])
        z = self.fusion.head(h)
        loss = F.cross_entropy(z, labels) if labels is not None else None
        return MultimodalOutput(loss=loss, logits=z, features={modality: h}, unimodal_logits={modality: z})


@register_architecture("shared_head")
def build_shared_head(model_cfg, modalities, input_shapes, num_classes) -> SharedHeadClassifier:
    return SharedHeadClassifier(SharedHeadConfig.from_recipe(model_cfg, modalities, input_shapes, num_classes))


register_auto(SharedHeadConfig, SharedHeadClassifier)
