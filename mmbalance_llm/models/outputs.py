"""The model-output contract every model driven by the trainer satisfies (docs/training.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput


@dataclass
class MultimodalOutput(ModelOutput):
    """`logits` fused [B, C]; `features` {modality: [B, d]}; `unimodal_logits` {modality: [B, C]} when the
    fusion head splits (their sum equals `logits`), else None; `loss` when labels were given.

    `aux_loss` (optional, only with labels): a model's own auxiliary objective on parameters that no
    balancer should modulate (e.g. detached probe heads). The trainer adds it to the balancer's loss, so
    it is trained under every method, `none` included; `loss` already contains it."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    features: Optional[dict] = None
    unimodal_logits: Optional[dict] = None
    aux_loss: Optional[torch.Tensor] = None
