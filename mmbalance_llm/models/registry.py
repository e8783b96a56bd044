"""Architecture registry: `model.architecture` in a recipe names a builder here.

A builder takes (model_cfg: config.ModelConfig, modalities, input_shapes, num_classes) and returns a
`transformers.PreTrainedModel` that satisfies the model-output contract (models/outputs.py) and has
`modality_parameters(m)`. Modules register builders with `@register_architecture("name")`.
"""
from __future__ import annotations

import difflib
import importlib

_BUILDERS: dict = {}
# Modules that register architectures; imported on first lookup so that the registry is complete.
_MODULES = ["mmbalance_llm.models.classifier", "mmbalance_llm.models.shared_head", "mmbalance_llm.models.mmtm",
            "mmbalance_llm.models.fusion_transformer"]


def register_architecture(name: str):
    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def _load() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def available_architectures() -> list:
    _load()
    return sorted(_BUILDERS)


def build_model(model_cfg, modalities, input_shapes, num_classes):
    _load()
    name = model_cfg.architecture
    if name not in _BUILDERS:
        match = difflib.get_close_matches(name, list(_BUILDERS), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else f" (available: {', '.join(sorted(_BUILDERS))})"
        raise ValueError(f"unknown model.architecture {name!r}{hint}")
    return _BUILDERS[name](model_cfg, modalities, input_shapes, num_classes)
