"""``MokaModel``: the peft tuner for MokA, plus its registration in peft and a fallback loader.

Registration follows the route verified for peft 0.21 (docs: TRANSFORMERS_MLLM.md §4): peft's ``PeftType``
enum is closed, so the string key "MOKA" is inserted into peft's private config / tuner / prefix mappings.
Then ``get_peft_model(model, MokaConfig())``, ``save_pretrained`` and plain
``PeftModel.from_pretrained(base, path)`` work, and ``adapter_config.json`` says ``"peft_type": "MOKA"``.
:func:`load_moka` passes ``config=`` explicitly, for code paths that bypass those mappings.
"""
from __future__ import annotations

import os

import peft
from peft.tuners.lora import LoraModel
from torch import nn

from mmbalance_llm.adapters.moka.config import MOKA_PEFT_TYPE, MokaConfig
from mmbalance_llm.adapters.moka.layer import MERGE_REFUSED, MokaLinear
from mmbalance_llm.adapters.moka.masks import MokaMaskContext

PEFT_VERIFIED = ((0, 21), (0, 22))  # [min, max) of peft versions whose private mappings this was verified on


def check_peft_version(version: str | None = None) -> None:
    """Raise a clear ImportError outside the verified peft range (set MMBALANCE_ALLOW_ANY_PEFT=1 to try anyway)."""
    v = version or peft.__version__
    parts = tuple(int(p) for p in v.split(".")[:2] if p.isdigit())
    lo, hi = PEFT_VERIFIED
    if not (lo <= parts < hi) and os.environ.get("MMBALANCE_ALLOW_ANY_PEFT") != "1":
        raise ImportError(f"MokA registers itself in peft's private mappings, verified for peft>={lo[0]}.{lo[1]},"
                          f"<{hi[0]}.{hi[1]}; found peft {v}. Install 'peft>=0.21,<0.22' "
                          "(or set MMBALANCE_ALLOW_ANY_PEFT=1 to try at your own risk).")


class MokaModel(LoraModel):
    """LoRA's tuner with MokA layers; fills the targets/modalities from the modality map and feeds the masks."""

    prefix: str = "lora_"
    tuner_layer_cls = MokaLinear

    def __init__(self, model, config, adapter_name, **kwargs) -> None:
        self._moka_ctx = None
        self._moka_hook = None
        super().__init__(model, config, adapter_name, **kwargs)
        self._install_mask_hook()

    # -- config resolution: MokaConfig() works on every supported family
    def _prepare_adapter_config(self, peft_config, model_config):
        from mmbalance_llm.models.modality_map import get_modality_map

        if not isinstance(peft_config, MokaConfig):
            raise TypeError(f"MokaModel needs a MokaConfig, got {type(peft_config).__name__}")
        if peft_config.target_modules is None or peft_config.modalities is None:
            mmap = get_modality_map(model_config)
            if peft_config.target_modules is None:
                peft_config.target_modules = mmap.target_modules_regex()
            if peft_config.modalities is None:
                peft_config.modalities = list(mmap.modalities)
        return peft_config

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        new = getattr(parent, target_name)
        if not isinstance(new, MokaLinear):
            raise ValueError(f"MokA supports nn.Linear targets only; {current_key} is {type(target).__name__}. "
                             "Narrow target_modules to the language model's linear projections.")
        if self._moka_ctx is not None:
            new.set_mask_context(self._moka_ctx)

    # -- masks
    def _install_mask_hook(self) -> None:
        from mmbalance_llm.models.modality_map import get_modality_map

        get_modality_map(self.model)  # clear error for an architecture without a map
        cfg = next(iter(self.peft_config.values()))
        self._moka_ctx = MokaMaskContext(self.model.config, question_after_media=cfg.question_after_media)
        for m in self.model.modules():
            if isinstance(m, MokaLinear):
                m.set_mask_context(self._moka_ctx)
        if self._moka_hook is None:
            # the tuner calls self.model(...), and generate() calls it at every step: one hook sees every forward
            self._moka_hook = self.model.register_forward_pre_hook(self._update_masks, with_kwargs=True)

    def _update_masks(self, module: nn.Module, args, kwargs):
        batch = dict(kwargs)
        if args and "input_ids" not in batch:
            batch["input_ids"] = args[0]
        self._moka_ctx.update(batch)
        return None

    @property
    def mask_context(self) -> MokaMaskContext:
        return self._moka_ctx

    # -- merging is refused
    def _check_merge_allowed(self):
        raise ValueError(MERGE_REFUSED)

    def unload(self):
        if self._moka_hook is not None:
            self._moka_hook.remove()
            self._moka_hook = None
        return super().unload()


def register_moka() -> None:
    """Insert "MOKA" into peft's mappings (idempotent)."""
    check_peft_version()
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[MOKA_PEFT_TYPE] = MokaConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[MOKA_PEFT_TYPE] = MokaModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[MOKA_PEFT_TYPE] = "lora_"


def load_moka(base_model, path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
    """Fallback loader: ``PeftModel.from_pretrained`` with the config passed explicitly."""
    from peft import PeftModel

    register_moka()
    cfg = MokaConfig.from_pretrained(path)
    return PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name, config=cfg,
                                     is_trainable=is_trainable, **kwargs)
