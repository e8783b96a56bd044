"""Balancing methods: a registry of `Balancer` classes, one module per method.

`available_methods()` lists the names, `get_method(name, **hparams)` builds one (unknown
hyperparameters are errors). Modules in this package register themselves on import with
`@register`; every module here is imported on first use, so adding a method is adding a file.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil

from mmbalance_llm.balance.base import Balancer, BalancerConfig, TrainContext, hp, model_inputs

_REGISTRY: dict = {}
_LOADED = False


def register(cls):
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"balancer name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def available_methods() -> list:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str):
    _load_all()
    if name not in _REGISTRY:
        match = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else f" (available: {', '.join(sorted(_REGISTRY))})"
        raise ValueError(f"unknown balance.method {name!r}{hint}")
    return _REGISTRY[name]


def _make_config(cls, hparams: dict):
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    valid = set(fields)
    hparams = dict(hparams)
    for key in hparams:
        if key not in valid:
            match = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else (
                f" (valid: {', '.join(sorted(valid))})" if valid else " (this method has no hyperparameters)")
            raise ValueError(f"unknown hyperparameter 'balance.{key}' for method '{cls.name}'{hint}")
        default = fields[key].default
        if isinstance(default, float) and isinstance(hparams[key], str):
            from mmbalance_llm.config import as_number

            hparams[key] = as_number(hparams[key])
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(hparams[key], bool) or not isinstance(hparams[key], (int, float))):
            raise ValueError(f"hyperparameter 'balance.{key}' of method '{cls.name}' must be a number, "
                             f"got {hparams[key]!r}")
        meta, value = fields[key].metadata, hparams[key]
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"hyperparameter 'balance.{key}' of method '{cls.name}' is {value!r}; choose one of "
                             f"{', '.join(map(str, meta['choices']))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = meta.get("min"), meta.get("max")
            if low is not None and (value < low or (meta.get("min_exclusive") and value == low)):
                raise ValueError(f"hyperparameter 'balance.{key}' of method '{cls.name}' must be "
                                 f"{'>' if meta.get('min_exclusive') else '>='} {low}, got {value!r}")
            if high is not None and value > high:
                raise ValueError(f"hyperparameter 'balance.{key}' of method '{cls.name}' must be <= {high}, "
                                 f"got {value!r}")
    return cls.config_class(**hparams)


def method_config(section: dict):
    """Validate a recipe's `balance` section; returns (class, config)."""
    section = dict(section)
    cls = method_class(section.pop("method", "none"))
    return cls, _make_config(cls, section)


def get_method(name: str = "none", **hparams) -> Balancer:
    cls = method_class(name)
    return cls(_make_config(cls, hparams))


__all__ = ["Balancer", "BalancerConfig", "TrainContext", "available_methods", "get_method", "hp",
           "method_config", "model_inputs", "register"]
