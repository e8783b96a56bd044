"""When does a balancing method first change the model? Read from the method's own config fields.

A run's checkpoint is chosen on validation. If fused validation accuracy peaks before the method's
first intervention (inside a warm-up, before the first reset or re-sampling), the saved model never saw
the method and its numbers are the baseline's. `first_active_epoch` gives the first 1-based epoch
whose validated model the method has changed (the numbering of `best_epoch` in final_metrics.json),
or None when the method never acts in the run (strength 0, a start past the last epoch, `none`).

The rules follow where each method intervenes: per-step methods act from epoch 1 unless they have a
start field; `on_epoch_end` interventions (Re-learning's reset, RollingQ's rotation) run before that
epoch's validation, so they count for that epoch; `on_epoch_start` re-sampling counts from the epoch it
starts. Methods not listed act from epoch 1.
"""
from __future__ import annotations

import dataclasses

# method -> the field holding its first active 0-based epoch (the epoch-gated methods).
START_FIELDS = {
    "ogm": "modulation_starts",
    "ogm_ge": "modulation_starts",
    "opm": "modulation_starts",
    "pmr": "modulation_starts",
    "cml": "modulation_starts",
    "mbsd": "modulation_starts",
    "modality_valuation": "warmup_epochs",
    "sample_valuation": "warmup_epochs",
}
# method -> field (or fields, all at 0) whose value 0 switches the method off (it reproduces the baseline).
STRENGTH_FIELDS = {
    "ogm": "alpha", "ogm_ge": "alpha", "agm": "alpha", "modality_valuation": "alpha", "relearning": "lam",
    "unimodal_aux": "weight", "inforeg": ("beta", "beta_other"), "rollingq": "r_time",
}


def method_settings(method: str, balance: dict | None = None) -> dict:
    """The method's config fields: its defaults, updated with the recipe's `balance` section."""
    from mmbalance_llm.balance import method_class

    cls = method_class(method)
    values = {}
    for f in dataclasses.fields(cls.config_class):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            values[f.name] = f.default_factory()  # type: ignore[misc]
    values.update({k: v for k, v in (balance or {}).items() if k != "method"})
    return values


def first_active_epoch(method: str, balance: dict | None = None, epochs: int | None = None) -> int | None:
    """First 1-based epoch whose validated model `method` (with recipe settings `balance`) has changed;
    None when it never acts within `epochs` (if given)."""
    if method == "none":
        return None
    c = method_settings(method, balance)
    strength = STRENGTH_FIELDS.get(method)
    fields = (strength,) if isinstance(strength, str) else (strength or ())
    if fields and not any(c.get(f) for f in fields):  # every strength field at 0: the method is off
        return None
    if method in START_FIELDS:
        first = int(c[START_FIELDS[method]]) + 1
        if "modulation_ends" in c and int(c["modulation_ends"]) < first - 1:
            return None
    elif method == "relearning":
        first = int(c["reinit_epoch"]) if int(c.get("reinit_num", 1)) > 0 else None
    else:
        first = 1
    if first is None or (epochs is not None and first > epochs):
        return None
    return first


def active_at(method: str, balance: dict | None, best_epoch: int | None, epochs: int | None = None) -> bool | None:
    """Whether the checkpoint of `best_epoch` had seen the method; None for `none` (nothing to see)."""
    if method == "none" or best_epoch is None:
        return None
    first = first_active_epoch(method, balance, epochs)
    return first is not None and best_epoch >= first
