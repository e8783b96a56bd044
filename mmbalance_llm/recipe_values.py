"""Recipe values: the one-line error type, `dotted.key=value` parsing and the check of one value against its
field's declaration (type, choices, range). `mmbalance_llm.config` re-exports all of it."""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe or an override is invalid. The message is one line naming the key."""


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(valid))})"


def unknown_key_error(where: str, key: str, valid) -> RecipeError:
    return RecipeError(f"unknown recipe key '{where}{key}'{_closest(key, valid)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 0.0003). Values are parsed as YAML (safe_load)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form dotted.key=value")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{text}' has an empty key part")
    try:
        parsed = as_number(yaml.safe_load(value)) if value != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return key.split("."), parsed


def as_number(value):
    """YAML 1.1 reads `3e-4` as a string; accept numeric strings where a number is expected."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _field_type(f: dataclasses.Field) -> str:
    """'bool' | 'int' | 'float' | 'str' | 'dict' | 'list' | 'any' from the annotation text."""
    text = str(f.type).replace("Optional[", "").replace("]", "")
    for name in ("bool", "int", "float", "str", "dict", "list"):
        if text == name:
            return name
    return "any"


def check_value(where: str, value, f: dataclasses.Field):
    """Type, choices and range of one value, from the field's declaration. Returns the coerced value."""
    kind, meta = _field_type(f), f.metadata
    if value is None:
        if "Optional" not in str(f.type) and kind != "any":
            raise RecipeError(f"recipe key '{where}' must be set (a {kind}), got null")
        return value
    if kind == "bool" and not isinstance(value, bool):
        raise RecipeError(f"recipe key '{where}' must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"recipe key '{where}' must be an integer, got {value!r}")
    if kind == "float":
        value = as_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"recipe key '{where}' must be a number (finite), got {value!r}")
        value = float(value)
    if kind == "str" and value is False and "no" in meta.get("choices", ()):
        value = "no"  # YAML 1.1 reads a bare `no` as false (eval_strategy: no, mixed_precision: no)
    if kind == "str" and not isinstance(value, str):
        raise RecipeError(f"recipe key '{where}' must be a string, got {value!r}")
    if kind == "dict" and not isinstance(value, dict):
        raise RecipeError(f"recipe key '{where}' must be a mapping, got {type(value).__name__}")
    if kind == "list" and not isinstance(value, list):
        raise RecipeError(f"recipe key '{where}' must be a list, got {type(value).__name__}")
    # a field of any type (e.g. train.report_to) may hold one choice or a list of them
    items = value if kind == "any" and isinstance(value, list) else [value]
    bad = [v for v in items if "choices" in meta and v not in meta["choices"]]
    if bad:
        shown = ", ".join(str(c) for c in meta["choices"] if c is not None)
        raise RecipeError(f"recipe key '{where}' is {bad[0]!r}; choose one of {shown}")
    if "min" in meta and isinstance(value, (int, float)):
        low = meta["min"]
        if value < low or (meta.get("min_exclusive") and value == low):
            raise RecipeError(f"recipe key '{where}' must be {'>' if meta.get('min_exclusive') else '>='} {low}, "
                              f"got {value!r}")
    if "max" in meta and isinstance(value, (int, float)) and value > meta["max"]:
        raise RecipeError(f"recipe key '{where}' must be <= {meta['max']}, got {value!r}")
    return value
