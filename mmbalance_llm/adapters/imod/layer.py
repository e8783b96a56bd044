"""The IMoD linear layer: peft's LoRA ``Linear`` plus the partition of ``A`` and the constraint gradients.

The forward output is LoRA's, unchanged (so IMoD merges like LoRA). State per adapter::

    lora_A, lora_B           LoRA's weights (same init as LoRA: B = 0, so a fresh adapter is the identity)
    lora_imod_partition      uint8 [r, d_in] element codes 0 text / 1 non-text / 2 shared: a saved buffer named
                             ``weight`` in a small module, so its key follows peft's ``lora_*.<adapter>.weight``
                             convention (hotswap, state-dict remapping)

While the tuner's mask context is collecting (a training forward with labels), each call also computes the
constraints' values and their gradient w.r.t. ``A`` under ``no_grad`` (closed form, constraints.py) and leaves
them in ``imod_pending`` for the tuner to turn into one loss term after the model's forward.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from mmbalance_llm.adapters.imod.constraints import constraint_grads, layer_shared_ratio, make_partition

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class ImodPartition(nn.Module):
    """Holds one adapter's element codes as the (integer, never trained) buffer ``weight``."""

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", codes)


class ImodLinear(LoraLinear):
    """LoRA ``Linear`` whose ``A`` carries IMoD's partition and, in training, the two constraint gradients."""

    other_param_names = LoraLinear.other_param_names + ("lora_imod_partition", "imod_weights")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if not hasattr(self, "lora_imod_partition"):  # first adapter: create the containers
            self.lora_imod_partition = nn.ModuleDict()
            self.imod_weights = {}
            self.imod_pending = []
            self._imod_ctx = None
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.imod_weights[adapter_name] = (float(config.decouple_weight), float(config.align_weight))

    def init_partition(self, adapter_name: str, key: str, config) -> None:
        """Draw this layer's partition from the config (layer index parsed from the module name ``key``)."""
        m = LAYER_INDEX.search(key)
        layer = int(m.group(1)) if m else 0
        shared = layer_shared_ratio(config.shared_ratio, config.shared_ratio_growth, layer, config.num_layers or 1)
        codes = make_partition(self.r[adapter_name], self.in_features, shared, config.text_ratio,
                               config.partition_seed, key)
        self.lora_imod_partition[adapter_name] = ImodPartition(codes.to(self.lora_A[adapter_name].weight.device))

    def set_mask_context(self, ctx) -> None:
        self._imod_ctx = ctx

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)
        ctx = getattr(self, "_imod_ctx", None)
        if ctx is None or not ctx.collecting or self.disable_adapters or self.merged:
            return result
        masks = ctx.lookup(x)
        if masks is None:
            return result
        text, other = masks
        with torch.no_grad():
            xf = x.detach().float()
            for adapter in self.active_adapters:
                if adapter not in self.lora_A:
                    continue
                l1, l2 = self.imod_weights[adapter]
                if not (l1 or l2):
                    continue
                A = self.lora_A[adapter].weight.detach().float()
                codes = self.lora_imod_partition[adapter].weight
                v_dec, v_ali, grad = constraint_grads(A, codes, xf, text, other, l1, l2)
                self.imod_pending.append((self.lora_A[adapter].weight, grad, l1 * v_dec + l2 * v_ali,
                                          v_dec, v_ali))
        return result

    def __repr__(self) -> str:
        return "imod." + super().__repr__()
