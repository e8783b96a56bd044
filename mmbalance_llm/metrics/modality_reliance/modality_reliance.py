"""Modality reliance: accuracy per evaluation condition and how much of it each removed modality takes away.

Rows are (prediction, reference, condition) triples, e.g. conditions ``full``, ``blank_image``, ``drop_image``,
``no_media`` and ``base_llm`` from ``mmbalance reliance``. Returns ``accuracy`` per condition, and for every
condition other than the full one ``delta = acc_full - acc_condition`` and ``ratio = delta / acc_full``.
MMStar's multimodal gain ``mg = acc_full - acc_no_media`` and leakage ``ml = max(0, acc_no_media - acc_base_llm)``
are added when those conditions are present (Chen et al. 2024, "Are We on the Right Way for Evaluating Large
Vision-Language Models?").
"""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: predicted answers (strings).
    references: gold answers (strings).
    conditions: the evaluation condition of each row.
    full_condition: name of the all-modalities condition (default "full").
    no_media_condition: name of the all-media-removed condition (default "no_media").
    base_condition: name of the base-LLM condition (default "base_llm").
Returns:
    accuracy: {condition: float}; delta, ratio: {condition: float}; mg, ml: float or None.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ModalityReliance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string"),
                                        "conditions": datasets.Value("string")}))

    def _compute(self, predictions, references, conditions, full_condition="full", no_media_condition="no_media",
                 base_condition="base_llm"):
        p, r, c = np.asarray(predictions, dtype=object), np.asarray(references, dtype=object), np.asarray(conditions)
        acc = {str(k): float(np.mean(p[c == k] == r[c == k])) for k in sorted(set(conditions))}
        if full_condition not in acc:
            raise ValueError(f"conditions: no row has the full condition {full_condition!r}; got {sorted(acc)}")
        full = acc[full_condition]
        others = [k for k in acc if k not in (full_condition, base_condition)]
        delta = {k: full - acc[k] for k in others}
        ratio = {k: (full - acc[k]) / full if full > 0 else 0.0 for k in others}
        mg = full - acc[no_media_condition] if no_media_condition in acc else None
        ml = (max(0.0, acc[no_media_condition] - acc[base_condition])
              if no_media_condition in acc and base_condition in acc else None)
        return {"accuracy": acc, "delta": delta, "ratio": ratio, "mg": mg, "ml": ml}
