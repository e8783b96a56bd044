"""Models: encoders, fusion heads and the multimodal classifier.

The public names load on first use: `import mmbalance_llm.models.fusion` (e.g. from a balancer module,
or from `mmbalance methods`) must not import transformers' model classes.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "MultimodalClassifier": "mmbalance_llm.models.classifier",
    "MultimodalClassifierConfig": "mmbalance_llm.models.classifier",
    "MultimodalOutput": "mmbalance_llm.models.outputs",
}

__all__ = ["MultimodalClassifier", "MultimodalClassifierConfig", "MultimodalOutput"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmbalance_llm.models' has no attribute {name!r}")
