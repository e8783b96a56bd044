"""The MokA linear layer: peft's LoRA ``Linear`` with one extra A per non-text modality.

Weights per adapter (state-dict names after peft removes the adapter name)::

    lora_A            A_text   (r x d_in)   -- LoRA's own A, used for text (and modalities without an A)
    lora_moka_A_<m>   A_m      (r x d_in)   -- m in image / video / audio
    lora_B            B        (d_out x r)  -- shared, zero-initialised, so a fresh adapter is the identity

The ``lora_`` prefix keeps peft's trainable-parameter and save logic working unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from mmbalance_llm.adapters.moka.masks import MokaMaskContext, cross_attend
from mmbalance_llm.models.modality_map import MODALITY_IDS

MOKA_MODALITIES = ("image", "video", "audio")
MERGE_REFUSED = ("MokA adapters cannot be merged into the base weights: the cross-attention term depends on the "
                 "other tokens of the sequence and each modality uses its own A, so no single weight delta exists. "
                 "Keep the adapter unmerged (or call unload() to drop it).")


class MokaLinear(LoraLinear):
    """LoRA ``Linear`` whose A is chosen per token by modality, plus the media-to-question cross-attention."""

    adapter_layer_names = LoraLinear.adapter_layer_names + tuple(f"lora_moka_A_{m}" for m in MOKA_MODALITIES)
    other_param_names = LoraLinear.other_param_names + ("moka_modalities", "moka_cross_attention_weight")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if not hasattr(self, "moka_modalities"):  # first adapter: create the containers
            for m in MOKA_MODALITIES:
                setattr(self, f"lora_moka_A_{m}", nn.ModuleDict())
            self.moka_modalities, self.moka_cross_attention_weight = {}, {}
            self._moka_ctx = None
        mods = tuple(config.modalities or ())
        for m in mods:
            getattr(self, f"lora_moka_A_{m}")[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.moka_modalities[adapter_name] = mods
        self.moka_cross_attention_weight[adapter_name] = float(config.cross_attention_weight)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if config.init_lora_weights is not False:  # same init as LoRA's A (kaiming-uniform); B stays zero
            for m in mods:
                nn.init.kaiming_uniform_(getattr(self, f"lora_moka_A_{m}")[adapter_name].weight, a=math.sqrt(5))
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def set_mask_context(self, ctx: MokaMaskContext) -> None:
        self._moka_ctx = ctx

    # -- merging is refused: the output is not W0 + delta
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(MERGE_REFUSED)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        raise ValueError(MERGE_REFUSED)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # no single low-rank delta exists (see MERGE_REFUSED)

    def _mixed_batch_forward(self, *args, **kwargs):
        raise ValueError("MokA does not support per-sample adapter_names (mixed-adapter batches)")

    def moka_delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's contribution ``scaling * B(h)`` for input ``x`` [.., d_in]."""
        A_text, B = self.lora_A[adapter], self.lora_B[adapter]
        xd = self.lora_dropout[adapter](x)
        ctx = getattr(self, "_moka_ctx", None)
        mod_ids, cross = ctx.lookup(x) if ctx is not None else (None, {})
        h_text = A_text(xd)
        if mod_ids is None:
            return B(h_text) * self.scaling[adapter]
        w = self.moka_cross_attention_weight[adapter]
        own = set()
        h = h_text
        for m in self.moka_modalities[adapter]:
            mid = MODALITY_IDS[m]
            if mid not in cross:  # no tokens of this modality in the batch
                continue
            own.add(mid)
            is_m = ctx.row_mask(mid, h_text.dtype)
            # A_m(x * m) as in the paper, written as A_m(x) * m (equal for a bias-free A and a row mask): A_m still
            # only sees, and gets gradient from, its own modality's rows, but autograd reuses the x it already
            # saved for A_text instead of saving a masked copy per modality (activation memory stays near LoRA's)
            h_m = getattr(self, f"lora_moka_A_{m}")[adapter](xd) * is_m
            if w:
                h_m = h_m + w * is_m * cross_attend(h_m, h_text, cross[mid], self.r[adapter])
            h = h * (1 - is_m) + h_m
        return B(h) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            self._mixed_batch_forward()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            x = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            result = result + self.moka_delta(x, adapter)
        return result.to(dtype)

    def __repr__(self) -> str:
        return "moka." + super().__repr__()
