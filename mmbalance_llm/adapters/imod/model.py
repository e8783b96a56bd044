"""``ImodModel``: the peft tuner for IMoD, its token masks, the constraint term, and registration in peft.

Masks: like MokA (adapters/moka/model.py), a forward pre-hook on the wrapped HF model reads the batch; here it
only needs :func:`mmbalance_llm.models.modality_map.modality_masks` (text vs. any non-text modality, padding in
neither) and only in a training forward with ``labels`` and gradients on. A forward hook then turns what the
layers computed into one term ``T`` whose value is ``sum_layers l1 (L_TS + L_OS) + l2 L_MA`` and whose gradient is
exactly the injected ``l1 G_MSD + l2 G_MA`` on each layer's ``A`` (nothing reaches B, the towers or earlier
layers)::

    T = sum_l <A_l, G_l> - stopgrad(sum_l <A_l, G_l>) + stopgrad(value)

Handing the gradient over as a loss term (rather than writing ``A.grad``) keeps it under the loop's loss
scaling: gradient accumulation, fp16 loss scaling and DDP averaging treat it like the task gradient. ``T`` is
``outputs.imod_loss`` (the SFT task adds it, logged as ``aux_loss``), or is added to ``outputs.loss`` with
``add_to_model_loss=True``.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraModel
from torch import nn

from mmbalance_llm.adapters.imod.config import IMOD_PEFT_TYPE, ImodConfig
from mmbalance_llm.adapters.imod.layer import ImodLinear
from mmbalance_llm.adapters.moka.model import _lm_targets, check_peft_version
from mmbalance_llm.adapters.peft_methods import (load_with_config, register_peft_method, require_linear,
                                                 resolve_token_ids)
from mmbalance_llm.models.modality_map import _cfg_get, get_modality_map, modality_masks


class ImodMaskContext:
    """Text / non-text token masks of the current training forward, shared by the IMoD layers of one model."""

    def __init__(self, model_config):
        self.model_config = model_config
        self.collecting = False
        self.text = self.other = None

    def update(self, batch: dict, collecting: bool) -> None:
        self.collecting, self.text, self.other = False, None, None
        if not collecting or (batch.get("input_ids") is None and batch.get("mm_token_type_ids") is None):
            return
        masks = modality_masks(batch, self.model_config)
        self.text = masks.pop("text")
        self.other = torch.stack(list(masks.values())).any(0) if masks else torch.zeros_like(self.text)
        self.collecting = True

    def lookup(self, x: torch.Tensor):
        """(text, other) bool [B,T] masks for hidden states ``x`` [B,T,d], or None when the shapes differ."""
        if self.text is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(self.text.shape):
            return None
        if self.text.device != x.device:  # model split over devices
            self.text, self.other = self.text.to(x.device), self.other.to(x.device)
        return self.text, self.other


class ImodModel(LoraModel):
    """LoRA's tuner with IMoD layers; fills targets / layer count / token ids and adds the constraint term."""

    prefix: str = "lora_"
    tuner_layer_cls = ImodLinear

    def __init__(self, model, config, adapter_name, **kwargs) -> None:
        self._imod_ctx = None
        self._imod_hooks = []
        self._imod_layers = None
        super().__init__(model, config, adapter_name, **kwargs)
        self._install_hooks()

    def _prepare_adapter_config(self, peft_config, model_config):
        if not isinstance(peft_config, ImodConfig):
            raise TypeError(f"ImodModel needs an ImodConfig, got {type(peft_config).__name__}")
        mmap = get_modality_map(model_config)
        if peft_config.target_modules is None:
            peft_config.target_modules = _lm_targets(mmap, peft_config)
        if peft_config.num_layers is None:
            peft_config.num_layers = int(_cfg_get(model_config, "num_hidden_layers") or 1)
        peft_config.modality_token_ids = resolve_token_ids("ImodConfig", peft_config.modality_token_ids,
                                                           mmap.token_ids(model_config))
        return peft_config

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        new = getattr(parent, target_name)
        require_linear("IMoD", new, ImodLinear, current_key, target)
        new.init_partition(adapter_name, current_key, lora_config)
        self._imod_layers = None
        if self._imod_ctx is not None:
            new.set_mask_context(self._imod_ctx)

    # -- masks and the constraint term
    def _install_hooks(self) -> None:
        get_modality_map(self.model)  # clear error for an architecture without a map
        self._imod_ctx = ImodMaskContext(self.model.config)
        for m in self.model.modules():
            if isinstance(m, ImodLinear):
                m.set_mask_context(self._imod_ctx)
        if not self._imod_hooks:
            self._imod_hooks = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                                self.model.register_forward_hook(self._after, with_kwargs=True)]

    def _layers(self) -> list:
        if self._imod_layers is None:  # cached: walking a 7B model's modules every step costs milliseconds
            self._imod_layers = [m for m in self.model.modules() if isinstance(m, ImodLinear)]
        return self._imod_layers

    def _before(self, module: nn.Module, args, kwargs):
        batch = dict(kwargs)
        if args and "input_ids" not in batch:
            batch["input_ids"] = args[0]
        cfg = self.peft_config.get(self.active_adapters[0])
        on = (self.model.training and torch.is_grad_enabled() and batch.get("labels") is not None
              and bool(cfg.decouple_weight or cfg.align_weight))
        for m in self._layers():
            m.imod_pending.clear()
        self._imod_ctx.update(batch, on)
        return None

    def _after(self, module: nn.Module, args, kwargs, output):
        if not self._imod_ctx.collecting:
            return output
        self._imod_ctx.collecting = False  # gradient-checkpoint recomputation in backward must not collect
        pending = [p for m in self._layers() for p in m.imod_pending]
        for m in self._layers():
            m.imod_pending.clear()
        if not pending:
            return output
        if not hasattr(output, "loss"):
            raise ValueError("IMoD needs the model's outputs as a ModelOutput (return_dict=True) to hand over its "
                             "constraint term; got a tuple")
        ghost = sum((w * g.to(w.dtype)).sum() for w, g, *_ in pending)
        value = sum(v.to(ghost.device) for _w, _g, v, *_ in pending).detach()
        term = ghost - ghost.detach() + value.to(ghost.dtype)
        parts = torch.stack([torch.stack([p[3], p[4]]).to(ghost.device) for p in pending]).mean(0).tolist()
        self.last_constraints = {"imod_decouple": parts[0], "imod_align": parts[1]}  # per-layer means, unweighted
        cfg = self.peft_config[self.active_adapters[0]]
        if getattr(cfg, "add_to_model_loss", False) and getattr(output, "loss", None) is not None:
            output.loss = output.loss + term
        else:
            output.imod_loss = term
        return output

    @property
    def mask_context(self) -> ImodMaskContext:
        return self._imod_ctx

    def unload(self):
        for h in self._imod_hooks:
            h.remove()
        self._imod_hooks = []
        return super().unload()


# config fields that change an IMoD adapter's training or output besides its weights (hotswap copies weights only)
HOTSWAP_KEYS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "alpha_pattern", "rank_pattern", "use_dora",
                "decouple_weight", "align_weight", "modality_token_ids")


def register_imod() -> None:
    """Insert "IMOD" into peft's mappings, and into hotswap's compatibility table (idempotent)."""
    check_peft_version()
    register_peft_method(IMOD_PEFT_TYPE, ImodConfig, ImodModel, HOTSWAP_KEYS)


def load_imod(base_model, path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
    """Fallback loader: ``PeftModel.from_pretrained`` with the config passed explicitly."""
    register_imod()
    return load_with_config(ImodConfig, base_model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
