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
