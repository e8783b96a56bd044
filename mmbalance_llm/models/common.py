"""Pieces every toolkit model shares: input checking, per-modality parameter names, Auto* registration."""
from __future__ import annotations


def check_modality_inputs(modalities: list, inputs: dict) -> None:
    """One keyword argument per modality, no more and no fewer (zeros drop a modality)."""
    unknown = set(inputs) - set(modalities)
    if unknown:
        raise TypeError(f"unexpected input(s) {sorted(unknown)}; this model's modalities are {modalities}")
    missing = [m for m in modalities if m not in inputs]
    if missing:
        raise TypeError(f"missing input(s) {missing}; pass zeros to drop a modality")


def encoder_parameters(encoders, modalities: list, modality: str):
    """(name, parameter) pairs of `encoders[modality]`, named as in the model's state dict."""
    if modality not in encoders:
        raise KeyError(f"unknown modality {modality!r}; modalities are {modalities}")
    for name, p in encoders[modality].named_parameters():
        yield f"encoders.{modality}.{name}", p


def register_auto(config_cls, model_cls) -> None:
    """Let AutoConfig / AutoModel.from_pretrained(dir) find the class once the toolkit is imported."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModel.register(config_cls, model_cls)
    except ValueError:  # already registered (module re-imported)
        pass


def keep_native_weight_names(model) -> None:
    """Make `save_pretrained` write the live parameter names. Without this, transformers 5 renames the
    weights of nested backbones that it knows (ViT, AST, ...) back to their legacy checkpoint names, and the
    trainer's reload of `best/model.safetensors` into the live model would find no matching key."""
    model._weight_conversions = []
