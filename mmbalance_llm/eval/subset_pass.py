"""Fused predictions with the inputs outside a modality subset zeroed, for the Shapley value v(S).

The plain way runs one full forward pass per subset: 2^M - 1 passes on top of the evaluation pass. For a
model that encodes each modality on its own and then fuses (`MultimodalClassifier`: forward is
`fuse(encode(...))`), the features of a real input are those the evaluation pass already computed, and
the features of a zeroed input depend only on the batch's shape: they are computed once per input shape
(one all-zero forward pass per distinct batch size, i.e. usually twice per evaluation) and every subset
costs one fused-logits head call (no unimodal logits, no loss). The tensors fed to the fusion are the very ones the plain way computes, so the
predictions (and Shapley values) are identical.

Anything else (cross-modal encoders such as MMTM, token-level fusion transformers, models with
forward hooks, autocast under mixed precision) takes the plain way.
"""
from __future__ import annotations

import torch


def subset_key(s) -> str:
    return f"subset::{','.join(sorted(s))}"


def encode_once_supported(core, accelerator) -> bool:
    """True when `core`'s forward is the per-modality `fuse(encode(...))` of MultimodalClassifier."""
    from mmbalance_llm.models.classifier import MultimodalClassifier

    if not isinstance(core, MultimodalClassifier):
        return False
    cls = type(core)
    if (cls.forward, cls.encode, cls.fuse) != (MultimodalClassifier.forward, MultimodalClassifier.encode,
                                               MultimodalClassifier.fuse):
        return False
    if core._forward_hooks or core._forward_pre_hooks or "forward" in vars(core):
        return False  # hooks or a patched forward (autocast wrappers) could change what the pass computes
    return getattr(accelerator, "mixed_precision", "no") == "no"


class SubsetPredictor:
    """`predictor(inputs, output)` -> {subset_key(S): fused argmax with inputs outside S zeroed}, where
    `output` is the model's output on the full `inputs` (its `features` are reused when possible)."""

    def __init__(self, model, accelerator, keep_sets):
        self.model = model
        self.keep_sets = list(keep_sets)
        self.core = accelerator.unwrap_model(model)
        self.encode_once = bool(self.keep_sets) and encode_once_supported(self.core, accelerator)
        self._zero_features = {}

    def _zeros(self, inputs: dict) -> dict:
        key = tuple((m, tuple(x.shape), x.dtype, x.device) for m, x in inputs.items())
        if key not in self._zero_features:
            zeros = {m: torch.zeros_like(x) for m, x in inputs.items()}
            self._zero_features[key] = dict(self.model(**zeros).features)
        return self._zero_features[key]

    @torch.no_grad()
    def __call__(self, inputs: dict, output) -> dict:
        preds = {}
        if not self.encode_once:
            for s in self.keep_sets:
                masked = {m: (x if m in s else torch.zeros_like(x)) for m, x in inputs.items()}
                preds[subset_key(s)] = self.model(**masked).logits.argmax(-1)
            return preds
        zero = self._zeros(inputs)
        fusion = self.core.fusion  # `fuse` is fusion(features) and a loss: the logits are all v(S) needs
        logits = getattr(fusion, "fused_logits", None) or (lambda feats: fusion(feats)[0])
        for s in self.keep_sets:
            feats = {m: (h if m in s else zero[m]) for m, h in output.features.items()}
            preds[subset_key(s)] = logits(feats).argmax(-1)
        return preds
