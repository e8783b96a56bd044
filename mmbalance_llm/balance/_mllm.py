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
* `AdapterGradScale`: forward hooks on every adapter ``lora_B`` that register a tensor hook on its output,
  multiplying the gradient at the token positions of each modality by that modality's coefficient.
"""
from __future__ import annotations

import contextlib

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


def adapter_b_modules(model) -> list:
    """Every adapter up-projection (peft LoRA / MokA ``lora_B[adapter]``) of the model's decoder."""
    out = []
    for mod in model.modules():
        lora_b = getattr(mod, "lora_B", None)
        if isinstance(lora_b, torch.nn.ModuleDict):
            out.extend(lora_b.values())
    return out


class AdapterGradScale:
    """Scales the gradient at each modality's token positions of every adapter output by a coefficient.

    ``arm(masks)`` before the forward ({modality: Bool[B,T]}): adapter outputs of that [B,T] get a tensor hook;
    ``set_coeffs(coeffs)`` any time before the backward ({modality: float}) fixes the factors the hooks apply
    (positions of a modality without a coefficient, and padding, keep factor 1; all-1 coefficients change
    nothing). Outputs of another [B,T] (generation, a dropped-modality batch) are not touched."""

    def __init__(self, model):
        self.modules = adapter_b_modules(model)
        if not self.modules:
            raise ValueError("the model has no adapter (lora_B) layers: the gradient modulation needs adapter: lora "
                             "or adapter: moka")
        self.masks, self.scale = None, None
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]

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

    def _apply(self, g):
        s = self.scale
        return None if s is None else g * s.to(g.device, g.dtype)

    def _hook(self, _mod, _inp, out):
        masks = self.masks
        if not masks or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor) or not out.requires_grad \
                or out.dim() != 3 or tuple(out.shape[:2]) != tuple(next(iter(masks.values())).shape):
            return None
        out.register_hook(self._apply)  # reads the coefficients at backward time
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
