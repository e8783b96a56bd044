"""Token-level modality attribution for the toolkit's classifiers and for HF multimodal LLMs.

    from mmbalance_llm.attribution import attribute
    res = attribute(model, batch, method="grad_x_input")      # AttributionResult
    res.scores            # [B, T] per-token scores
    res.modality_share    # {modality: [B]} summing to 1 per sample
    res.target, res.baseline

Methods: ``attention``, ``grad_x_input``, ``integrated_gradients``, ``shapley_modality``, ``shapley_tokens``,
``ablation`` (see docs/attribution.md). The model kind is detected: an HF MLLM with a modality map
(LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio) or a classifier following the toolkit's output contract.
"""
from __future__ import annotations

from mmbalance_llm.attribution.result import AttributionResult

METHOD_NAMES = ("attention", "grad_x_input", "integrated_gradients", "shapley_modality", "shapley_tokens", "ablation")

__all__ = ["attribute", "make_adapter", "AttributionResult", "METHOD_NAMES"]


def is_hf_mllm(model) -> bool:
    from mmbalance_llm.models.modality_map import supported_model_types

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "model_type", None) in supported_model_types()


def make_adapter(model, batch: dict, target=None):
    """The adapter that scores ``batch`` on ``model`` (HF MLLM or classifier)."""
    if is_hf_mllm(model):
        from mmbalance_llm.attribution.hf import HFAdapter

        return HFAdapter(model, batch, target)
    from mmbalance_llm.attribution.classifier import ClassifierAdapter

    return ClassifierAdapter(model, batch, target)


def attribute(model, batch: dict, method: str = "grad_x_input", target=None, adapter=None, **options):
    """Attribute the target on ``batch`` to tokens and modalities with ``method``.

    ``target``: for a classifier a class id or [B] ids (default: the predicted class); for an MLLM answer token
    ids (one list, or one list per sample) appended to the prompt (default: the batch ``labels``, else the
    greedy next token). ``options`` go to the method (``steps``/``baseline`` for integrated gradients,
    ``n_groups``/``n_permutations``/``exact`` for shapley_tokens). Pass ``adapter`` (from :func:`make_adapter`)
    to run several methods on one batch without re-running the shared preparation.
    """
    from mmbalance_llm.attribution.methods import METHODS, frozen

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    with frozen(model):
        ad = adapter if adapter is not None else make_adapter(model, batch, target)
        return METHODS[method](ad, **options)
