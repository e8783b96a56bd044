"""`ume`: Uni-Modal Ensemble.

Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML 2023 (UME; the
companion method UMT is `umt`). Not in the reference toolkit. Stage: objective.
Follows: paper only (Sec. 4, the unweighted logit ensemble of independently trained unimodal models).

UME trains every unimodal model independently and predicts with the sum of their logits. In this
toolkit's model contract that is a concat-fusion classifier trained with

    L = sum_m CE(z_m),   z_m = W[:, S_m] h_m + b / M   (the split concat head)

and no fused loss: encoder m and its column block W[:, S_m] receive gradient only from CE(z_m), so the
branches are trained independently, with no cross-modal gradient. The model's fused logits are
z = sum_m z_m, i.e. exactly the (unweighted) ensemble of the unimodal branches, so evaluation, checkpoint
choice and saved models need nothing special. The one parameter shared by the branches is the head bias b
(each branch uses b / M, a class prior); it is the only parameter that gets gradient from several
modalities.

Requires `model.fusion: concat` (with `sum` fusion the weight matrix is shared across modalities, which
would couple the branches); anything else is an error.

Defaults: no hyperparameters; the ensemble weights are equal (the paper's unweighted sum of logits;
a weighted ensemble would need a different head and is not offered).

M > 2: supported (one branch per modality).

Differences from the paper: the branches are trained jointly in one model (one optimizer, one schedule)
instead of as separate runs; as their gradients do not interact except through the shared bias b / M,
this equals separate training up to that class prior and the shared learning-rate schedule.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer


@register
class UME(Balancer):
    name = "ume"
    stage = "objective"
    paper = "Du et al., On Uni-Modal Feature Learning in Supervised Multi-Modal Learning, ICML 2023 (UME)"
    requires_unimodal_logits = True

    def build_model(self, model_cfg, modalities, input_shapes, num_classes):
        if model_cfg.fusion != "concat":
            raise ValueError(f"balance.method 'ume' requires model.fusion: concat (got {model_cfg.fusion!r}); "
                             f"other heads couple the unimodal branches")
        return super().build_model(model_cfg, modalities, input_shapes, num_classes)

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        uni = {m: F.cross_entropy(z, labels) for m, z in outputs.unimodal_logits.items()}
        return sum(uni.values()), {f"loss_{m}": v.item() for m, v in uni.items()}
