"""``MokaModel``: the peft tuner for MokA, plus its registration in peft and a fallback loader.

peft's ``PeftType`` enum is closed, so registration inserts the key "MOKA" (a :class:`MokaPeftType`, a string
with ``.value``) into peft's private config / tuner / prefix mappings and hotswap's compatibility table; this was
verified for peft 0.21 (hence the version pin). Then ``get_peft_model(model, MokaConfig())``, ``save_pretrained``,
plain ``PeftModel.from_pretrained(base, path)``, transformers' ``load_adapter`` and peft's ``hotswap_adapter``
work, and ``adapter_config.json`` says ``"peft_type": "MOKA"``. :func:`load_moka` passes ``config=`` explicitly,
for code paths that bypass those mappings.
"""
from __future__ import annotations

import os

import peft
from peft.tuners.lora import LoraModel
from torch import nn

from mmbalance_llm.adapters.moka.config import MOKA_PEFT_TYPE, MokaConfig
from mmbalance_llm.adapters.moka.layer import MERGE_REFUSED, MokaLinear
from mmbalance_llm.adapters.moka.masks import MokaMaskContext
from mmbalance_llm.adapters.peft_methods import (load_with_config, register_peft_method, require_linear,
                                                 resolve_token_ids)
from mmbalance_llm.models.modality_map import LM_PROJECTIONS

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
        mmap = get_modality_map(model_config)
        if peft_config.target_modules is None:
            peft_config.target_modules = _lm_targets(mmap, peft_config)
        if peft_config.modalities is None:
            peft_config.modalities = list(mmap.modalities)
        missing = [m for m in peft_config.modalities if m not in mmap.modalities]
        if missing:
            raise ValueError(f"MokaConfig.modalities: the adapter has an A for {missing[0]!r}, which model_type "
                             f"{mmap.model_type!r} does not accept (its modalities: {list(mmap.modalities)})")
        ids = {m: t for m, t in mmap.token_ids(model_config).items() if m in peft_config.modalities}
        peft_config.modality_token_ids = resolve_token_ids("MokaConfig", peft_config.modality_token_ids, ids)
        return peft_config

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        new = getattr(parent, target_name)
        require_linear("MokA", new, MokaLinear, current_key, target)
        if self._moka_ctx is not None:
            new.set_mask_context(self._moka_ctx)

    # -- masks
    def _install_mask_hook(self) -> None:
        from mmbalance_llm.models.modality_map import get_modality_map

        get_modality_map(self.model)  # clear error for an architecture without a map
        cfg = next(iter(self.peft_config.values()))
        self._moka_ctx = MokaMaskContext(self.model.config, question_after_media=cfg.question_after_media,
                                         answer_marker=cfg.answer_marker_ids)
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

    # -- merging, weighted combination and conversion to LoRA are refused
    def _check_merge_allowed(self):
        raise ValueError(MERGE_REFUSED)

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", **kwargs):
        """Exact ``combination_type="cat"`` for adapters without cross-attention (``cross_attention_weight=0``):
        every A (text and per modality) is stacked and B holds ``weight_i * scaling_i * B_i``, so the new adapter's
        output is the weighted sum of theirs. Everything else is refused: with cross-attention the output is a
        softmax over products of A's, and LoRA's rules (which touch lora_A / lora_B only) would leave the
        per-modality A's at their random init."""
        from dataclasses import replace

        import torch

        from peft.utils import _freeze_adapter

        cfgs = [self.peft_config[a] for a in adapters if a in self.peft_config]
        if len(cfgs) != len(adapters) or len(weights) != len(adapters):
            raise ValueError("add_weighted_adapter: every adapter must exist, with one weight each")
        refuse = (combination_type != "cat" or kwargs or any(c.cross_attention_weight for c in cfgs)
                  or len({(tuple(c.modalities), str(c.target_modules)) for c in cfgs}) > 1
                  or any(c.rank_pattern or c.alpha_pattern or c.modules_to_save for c in cfgs))
        if refuse:
            raise ValueError("MokA adapters cannot be combined with add_weighted_adapter except combination_type="
                             "'cat' of adapters with cross_attention_weight=0, the same modalities and targets and no "
                             "modules_to_save "
                             "(the cross-attention is not linear in the A matrices)")
        if adapter_name in self.peft_config:
            return
        new_r = sum(c.r for c in cfgs)
        self.peft_config[adapter_name] = replace(cfgs[0], r=new_r, lora_alpha=new_r, alpha_pattern={}, rank_pattern={})
        self.inject_adapter(self.model, adapter_name)
        _freeze_adapter(self.model, adapter_name)
        with torch.no_grad():
            for m in self.model.modules():
                if not isinstance(m, MokaLinear) or adapter_name not in m.lora_A:
                    continue
                m.lora_A[adapter_name].weight.copy_(torch.cat([m.lora_A[a].weight for a in adapters], 0))
                for mod in m.moka_modalities[adapter_name]:
                    A = getattr(m, f"lora_moka_A_{mod}")
                    A[adapter_name].weight.copy_(torch.cat([A[a].weight for a in adapters], 0))
                m.lora_B[adapter_name].weight.copy_(torch.cat(
                    [w * m.scaling[a] * m.lora_B[a].weight for a, w in zip(adapters, weights)], 1))

    def unload(self):
        if self._moka_hook is not None:
            self._moka_hook.remove()
            self._moka_hook = None
        return super().unload()


def _lm_targets(mmap, config) -> str:
    """The language-model projection regex, restricted to ``config.layers_to_transform`` when set.

    peft ignores ``layers_to_transform`` for a regex target (and refuses the pair when the saved config is
    loaded), so the layer indices go into the regex and the two layer fields are cleared.
    """
    if config.layers_to_transform is None:
        return mmap.target_modules_regex()
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else list(layers)
    pattern = config.layers_pattern or "layers"
    pattern = [pattern] if isinstance(pattern, str) else list(pattern)
    lm = "|".join(p.replace(".", r"\.") for p in mmap.language_model if p != "lm_head")
    regex = (rf"(.*\.)?({lm})\.(.*\.)?({'|'.join(pattern)})\.({'|'.join(str(i) for i in layers)})\."
             rf"(.*\.)?({'|'.join(LM_PROJECTIONS)})")
    config.layers_to_transform, config.layers_pattern = None, None
    return regex


# config fields that change a MokA adapter's output besides its weights (peft's hotswap copies weights only)
HOTSWAP_KEYS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "alpha_pattern", "rank_pattern", "use_dora",
                "modalities", "cross_attention_weight", "question_after_media", "modality_token_ids")


def register_moka() -> None:
    """Insert "MOKA" into peft's mappings, and into hotswap's compatibility table (idempotent)."""
    check_peft_version()
    register_peft_method(MOKA_PEFT_TYPE, MokaConfig, MokaModel, HOTSWAP_KEYS)


def load_moka(base_model, path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
    """Fallback loader: ``PeftModel.from_pretrained`` with the config passed explicitly."""
    register_moka()
    return load_with_config(MokaConfig, base_model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
