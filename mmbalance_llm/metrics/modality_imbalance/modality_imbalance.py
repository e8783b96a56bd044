"""Modality imbalance from per-sample modality contributions (Shapley values, attribution shares, unimodal
accuracies): the mean contribution per modality, its share of the absolute total, and the imbalance score

    Imb = sum_{i<j} |phi_i - phi_j| / ((M - 1) * sum_m |phi_m|)

(0 = balanced, 1 = one modality carries everything; for M = 2 it is |phi_1 - phi_2| / (|phi_1| + |phi_2|)).
Rows are (modality, score) pairs.
"""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    modalities: the modality of each row.
    scores: the contribution of that modality on one sample.
Returns:
    mean: {modality: float}, share: {modality: float}, imbalance: float, dominant: str.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ModalityImbalance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"modalities": datasets.Value("string"), "scores": datasets.Value("float64")}))

    def _compute(self, modalities, scores):
        m, s = np.asarray(modalities), np.asarray(scores, dtype=np.float64)
        names = sorted(set(modalities))
        mean = {k: float(s[m == k].mean()) for k in names}
        vals = np.array([mean[k] for k in names])
        tot = np.abs(vals).sum()
        share = {k: float(abs(mean[k]) / tot) if tot > 0 else 1.0 / len(names) for k in names}
        n = len(vals)
        pair = sum(abs(vals[i] - vals[j]) for i in range(n) for j in range(i + 1, n))
        imb = float(pair / ((n - 1) * tot)) if n > 1 and tot > 0 else 0.0
        return {"mean": mean, "share": share, "imbalance": imb, "dominant": max(share, key=share.get)}
