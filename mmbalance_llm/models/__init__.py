"""Models: encoders, fusion heads and the multimodal classifiers.

The public names load on first use: `import mmbalance_llm.models.fusion` (e.g. from a balancer module, or
from `mmbalance methods`) must not import transformers' model classes. `register_all()` imports every
classifier architecture of the toolkit (the concat/sum/film/gated classifier, the attention-fusion
FusionTransformer, MLA's shared head, Greedy's MMTM), which registers each with `AutoConfig` / `AutoModel`,
so `AutoModel.from_pretrained(run/best)` loads any of them; the CLI calls it before reading a saved model.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "MultimodalClassifier": "mmbalance_llm.models.classifier",
    "MultimodalClassifierConfig": "mmbalance_llm.models.classifier",
    "FusionTransformer": "mmbalance_llm.models.fusion_transformer",
    "FusionTransformerConfig": "mmbalance_llm.models.fusion_transformer",
    "MMTMClassifier": "mmbalance_llm.models.mmtm",
    "MMTMConfig": "mmbalance_llm.models.mmtm",
    "SharedHeadClassifier": "mmbalance_llm.models.shared_head",
    "SharedHeadConfig": "mmbalance_llm.models.shared_head",
    "MultimodalOutput": "mmbalance_llm.models.outputs",
}

__all__ = sorted(_LAZY) + ["register_all"]


def register_all() -> None:
    """Import (and so register with AutoConfig / AutoModel) every classifier architecture."""
    for module in sorted(set(_LAZY.values())):
        importlib.import_module(module)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmbalance_llm.models' has no attribute {name!r}")
