"""POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models"): accuracy,
precision, recall and F1 with "yes" as the positive class, and the yes-ratio (share of "yes" predictions).
Answers are compared case-insensitively; anything that is not "yes" counts as "no"."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: "yes"/"no" strings.
    references: "yes"/"no" strings.
Returns:
    accuracy, precision, recall, f1, yes_ratio (floats).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Pope(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        p = np.array([str(x).strip().lower() == "yes" for x in predictions])
        r = np.array([str(x).strip().lower() == "yes" for x in references])
        tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"accuracy": float((p == r).mean()), "precision": precision, "recall": recall, "f1": f1,
                "yes_ratio": float(p.mean())}
