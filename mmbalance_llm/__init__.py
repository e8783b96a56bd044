"""mmbalance_llm: balanced fine-tuning of multimodal Transformers and multimodal LLMs.

Heavy submodules load lazily so that `import mmbalance_llm` stays cheap; the names below are the
public API.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MultimodalClassifier": "mmbalance_llm.models.classifier",
    "MultimodalClassifierConfig": "mmbalance_llm.models.classifier",
    "load_recipe": "mmbalance_llm.config",
    "Recipe": "mmbalance_llm.config",
    "get_method": "mmbalance_llm.balance",
    "available_methods": "mmbalance_llm.balance",
    "Trainer": "mmbalance_llm.train.trainer",
    "train": "mmbalance_llm.train.trainer",
}

# MokA (issue 6): public names, and registration with peft on the first `import peft` (no eager torch import).
_LAZY.update({"MokaConfig": "mmbalance_llm.adapters.moka", "MokaModel": "mmbalance_llm.adapters.moka",
              "load_moka": "mmbalance_llm.adapters.moka"})
_LAZY.update({"ImodConfig": "mmbalance_llm.adapters.imod", "ImodModel": "mmbalance_llm.adapters.imod",
              "load_imod": "mmbalance_llm.adapters.imod"})
from mmbalance_llm.adapters import install_peft_registration as _install_peft_registration  # noqa: E402

_install_peft_registration()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmbalance_llm' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
