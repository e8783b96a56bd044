"""Per-modality learning rates: `model.encoders.<modality>.lr` splits the optimizer's parameter groups.

A pretrained backbone usually wants a smaller step than the fusion head trained from scratch (e.g. ViT at
1e-5 next to a head at 1e-3). `modality_lr_groups` takes the groups the optimizer builder already made
(any split, e.g. decay / no-decay) and moves the parameters of every modality that sets `lr` into copies
of those groups carrying that `lr`; everything else keeps `train.learning_rate`. Without any per-modality `lr` it
returns the groups unchanged.
"""
from __future__ import annotations


def modality_learning_rates(model) -> dict:
    """{modality: lr} for the modalities whose encoder settings set `lr`."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "encoder_settings"):
        return {}
    rates = {}
    for m in getattr(model, "modalities", []) or []:
        lr = (config.encoders.get(m) or {}).get("lr")
        if lr is not None:
            lr = float(lr)
            if lr <= 0:
                raise ValueError(f"model.encoders.{m}.lr must be > 0, got {lr}")
            rates[m] = lr
    return rates


def modality_lr_groups(model, groups: list) -> list:
    """Split `groups` (dicts with 'params') so that each modality with its own `lr` gets its own groups."""
    rates = modality_learning_rates(model)
    if not rates:
        return groups
    owner = {}
    for m in rates:
        for _, p in model.modality_parameters(m):
            owner[id(p)] = m
    out = []
    for group in groups:
        params = list(group["params"])
        rest = [p for p in params if id(p) not in owner]
        if rest:
            out.append({**group, "params": rest})
        for m, lr in rates.items():
            mine = [p for p in params if owner.get(id(p)) == m]
            if mine:
                out.append({**group, "params": mine, "lr": lr, "modality": m})
    return out
