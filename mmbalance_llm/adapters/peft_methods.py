"""What MokA and IMoD share as peft methods: registering a new PEFT type in peft's (private) mappings and
loading a saved adapter with its config passed explicitly."""
from __future__ import annotations


def register_peft_method(peft_type, config_cls, model_cls, hotswap_keys) -> None:
    """Insert ``peft_type`` into peft's config / tuner / prefix mappings and into hotswap's compatibility table
    (the config fields that change the adapter's output besides its weights). Idempotent."""
    from peft import mapping
    from peft.utils import hotswap

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = "lora_"
    hotswap.CONFIG_KEYS_TO_CHECK[peft_type] = list(hotswap_keys)


def load_with_config(config_cls, base_model, path, adapter_name: str = "default", is_trainable: bool = False,
                     **kwargs):
    """``PeftModel.from_pretrained`` with the adapter's config read by ``config_cls`` and passed explicitly (the
    fallback when peft's own lookup of the PEFT type is not available)."""
    from peft import PeftModel

    cfg = config_cls.from_pretrained(path)
    return PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name, config=cfg,
                                     is_trainable=is_trainable, **kwargs)


def resolve_token_ids(config_name: str, saved, model_ids: dict) -> dict:
    """The adapter's modality placeholder token ids: the model's when the config has none; else the config's,
    refused in one line when one differs from the base model's (the adapter was made for another model)."""
    if saved is None:
        return dict(model_ids)
    saved = {m: int(t) for m, t in saved.items()}
    diff = [m for m in saved if m in model_ids and saved[m] != model_ids[m]]
    if diff:
        raise ValueError(f"{config_name}.modality_token_ids: the adapter's {diff[0]} token id is {saved[diff[0]]}, "
                         f"the base model's is {model_ids[diff[0]]}; it was made for another model")
    return saved


def require_linear(method: str, layer, layer_cls, current_key: str, target) -> None:
    """The method's layers replace nn.Linear projections only."""
    if not isinstance(layer, layer_cls):
        raise ValueError(f"{method} supports nn.Linear targets only; {current_key} is {type(target).__name__}. "
                         "Narrow target_modules to the language model's linear projections.")
