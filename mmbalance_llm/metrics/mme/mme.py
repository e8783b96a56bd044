"""MME (Fu et al. 2023) scoring: per category, acc (per question) and acc+ (per image: all of its questions
right, usually one yes and one no question), score = 100 * (acc + acc+); the total is the sum over categories."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: "yes"/"no" strings.
    references: "yes"/"no" strings.
    categories: the MME category of each question.
    groups: the image (or any id) whose questions form one acc+ unit.
Returns:
    {category: {acc, acc_plus, score}}, and total.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Mme(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string"),
                                        "categories": datasets.Value("string"), "groups": datasets.Value("string")}))

    def _compute(self, predictions, references, categories, groups):
        ok = np.array([str(a).strip().lower() == str(b).strip().lower() for a, b in zip(predictions, references)])
        cats, grp = np.asarray(categories), np.asarray(groups)
        out, total = {}, 0.0
        for c in sorted(set(categories)):
            sel = cats == c
            per_img = [bool(ok[sel & (grp == g)].all()) for g in sorted(set(grp[sel]))]
            acc, acc_plus = float(ok[sel].mean()), float(np.mean(per_img))
            out[c] = {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus)}
            total += out[c]["score"]
        out["total"] = total
        return out
