"""Shared pieces of the MLLM balancers (task `sft`): answer log-probabilities, removing a modality from a
batch, and token-masked gradient scaling inside the adapter.

* `answer_logprob(logits, labels)`: per sample, the summed log-probability of the answer tokens
  (`labels != -100`, teacher forced) and their count.
* `without(batch, modality, model, removal)`: the batch with one non-text modality removed: ``blank`` zeroes
  its media tensor (normalised pixels / log-mel; placeholders and sequence length kept, the same convention as
  `mmbalance reliance`), ``drop`` removes its placeholder tokens and media tensors (attribution.hf.drop_modality).
* `blank_prompt_text(model, batch)`: a context manager in which the decoder's input embeddings of the prompt's
  text tokens are zero (the first position, the media positions and the answer tokens are kept): "text removed"
  at unchanged sequence length, so MokA's masks and gradient checkpointing see the same layout.
* `AdapterGradScale`: every adapter projection (LoRA / MokA A and B) runs as a linear whose weight gradient
  has each modality's token-position contributions scaled by that modality's coefficient.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from mmbalance_llm.attribution.hf import BLANK_KEYS, drop_modality

IGNORE = -100
REMOVALS = ("blank", "drop")


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer-token log-prob [B], answer-token count [B]); gradients flow through ``logits``."""
    lab = labels[:, 1:]
    mask = lab != IGNORE
    lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(1), mask.sum(1)


def media_modalities(batch: dict, masks: dict) -> list:
    """The non-text modalities with tokens and a media tensor in this batch."""
    return [m for m in masks if m != "text" and bool(masks[m].any()) and BLANK_KEYS.get(m) in batch]


def without(batch: dict, modality: str, model, removal: str = "blank") -> dict:
    if removal == "blank":
        key = BLANK_KEYS[modality]
        return {**batch, key: torch.zeros_like(batch[key])}
    return drop_modality(batch, modality, model)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def blank_prompt_text(model, batch: dict, text_mask: torch.Tensor):
    """Zero the input embeddings at prompt-text positions (not the first real token, not answer tokens)."""
    keep_pos = torch.zeros_like(text_mask)
    am = batch.get("attention_mask")
    first = am.long().argmax(1) if am is not None else torch.zeros(len(text_mask), dtype=torch.long)
    keep_pos[torch.arange(len(text_mask)), first] = True
    zero = text_mask & (batch["labels"] == IGNORE) & ~keep_pos
    emb = _base(model).get_input_embeddings()

    def hook(_mod, _inp, out):
        if out.dim() == 3 and tuple(out.shape[:2]) == tuple(zero.shape):
            return out * (~zero).unsqueeze(-1).to(out.dtype)
        return out

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def adapter_modules(model) -> list:
    """(name, kind, module) of every adapter projection: kind "A" for LoRA's ``lora_A[adapter]`` and MokA's
    ``lora_moka_A_<m>[adapter]``, kind "B" for ``lora_B[adapter]``."""
    out = []
    for name, mod in model.named_modules():
        for attr, holder in mod._modules.items():
            if not isinstance(holder, torch.nn.ModuleDict):
                continue
            kind = "A" if attr == "lora_A" or attr.startswith("lora_moka_A_") else "B" if attr == "lora_B" else None
            if kind:
                out.extend((f"{name}.{attr}.{k}", kind, v) for k, v in holder.items())
    return out


class _TokenScaledLinear(torch.autograd.Function):
    """``linear(x, W, b)`` whose weight (and bias) gradient is sum_t s_t g_t x_t^T, s read from ``owner.scale`` at
    backward time; the input gradient g W is unscaled. One product forward, two backward: a plain linear's cost."""

    @staticmethod
    def forward(ctx, x, weight, bias, owner):
        ctx.save_for_backward(x, weight)
        ctx.owner, ctx.has_bias = owner, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.matmul(w.to(g.dtype)).to(x.dtype)
        s = ctx.owner.scale
        gs = g if s is None else g * s.to(g.device, g.dtype)
        gs2 = gs.reshape(-1, gs.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = gs2.t().matmul(x.reshape(-1, x.shape[-1]).to(gs.dtype)).to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gs2.sum(0).to(w.dtype)
        return gx, gw, gb, None


class AdapterGradScale:
    """Scales the adapter weights' gradient contributions from each modality's token positions by a coefficient.

    Every adapter projection P (LoRA's A and B, MokA's A_m; ``nn.Linear``) runs, while armed, as a linear whose
    backward returns dL/dW = sum_t k_{m(t)} g_t x_t^T (k of position t's modality) and the unscaled input gradient
    g W: exactly the weights' per-position contributions scaled, nothing else in the backward changed (MokA's A_m,
    which only sees its own modality's positions, gets exactly k_m times its gradient). The projection's forward is
    replaced on the instance (removed by ``remove()``); unarmed it is the plain ``F.linear``.

    ``arm(masks)`` before the forward ({modality: Bool[B,T]}); ``set_coeffs(coeffs)`` any time before the backward
    ({modality: float}; positions of a modality without a coefficient, and padding, keep factor 1; all-1
    coefficients change nothing). Inputs of another [B,T] (generation, a dropped-modality batch) are not touched."""

    def __init__(self, model):
        self.modules = [mod for _n, _k, mod in adapter_modules(model) if isinstance(mod, torch.nn.Linear)]
        if not self.modules:
            raise ValueError("the model has no adapter (lora_B) layers: the gradient modulation needs adapter: lora "
                             "or adapter: moka")
        self.masks, self.scale = None, None
        for mod in self.modules:
            mod.forward = functools.partial(self._forward, mod)

    def arm(self, masks: dict | None) -> None:
        self.masks, self.scale = masks, None

    def set_coeffs(self, coeffs: dict | None) -> None:
        self.scale = None
        if not self.masks or not coeffs or all(c == 1.0 for c in coeffs.values()):
            return
        any_mask = next(iter(self.masks.values()))
        scale = torch.ones(any_mask.shape, dtype=torch.float32, device=any_mask.device)
        for m, c in coeffs.items():
            if c != 1.0 and m in self.masks:
                scale[self.masks[m]] = float(c)
        self.scale = scale.unsqueeze(-1)

    def _forward(self, mod, x):
        masks = self.masks
        if not masks or not torch.is_grad_enabled() or x.dim() != 3 \
                or tuple(x.shape[:2]) != tuple(next(iter(masks.values())).shape):
            return F.linear(x, mod.weight, mod.bias)
        return _TokenScaledLinear.apply(x, mod.weight, mod.bias, self)

    def remove(self) -> None:
        for mod in self.modules:
            mod.__dict__.pop("forward", None)
        self.modules = []
