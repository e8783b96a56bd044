"""`mla`: Multimodal Learning with Alternating unimodal adaptation.

Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal Adaptation",
CVPR 2024 (MLA). Stage: feed-forward (own architecture and own step order).
Follows: the paper (Sec. 3, Eq. for the gradient modification and the test-time entropy gating). Compared
with Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation@ab6c184579f9ff390e9c9b8216c9900c2a43545b:
main.py, utils/utils.py and with GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3:balancemm/trainer/MLA_trainer.py.

Architecture: per-modality encoders and one linear head shared by all modalities (models/shared_head.py,
built from the recipe's `model` section; `fusion` is ignored). Training: for every batch, each modality
in turn takes its own optimizer step on CE(head(h_m), y) (only encoder m and the head run). The head's
weight gradient of modality m's step is projected orthogonally to the inputs the head has seen from the
*other* modalities (OWM-style gradient modification), so learning m does not erase them:
G <- G Q_m, and after the step each Q_k (k != m) absorbs m's mean feature r:
k = Q_k r, Q_k <- Q_k - k k^T / (a + r^T k), with a = a0^(1 + b / n_batches) (b the batch index).
Inference fuses the unimodal logits with entropy gates w_m = softmax_m(-H(softmax z_m)).

Defaults: a0 = 0.1 (MLA's schedule 0.1^(1 + b/n)), the learning rate is the recipe's (one scheduler step per
batch, so the schedule matches other methods), modality order = data order.
M > 2: yes. One projector per modality, Q_m built from all other modalities' features; gating is over M.

Differences from the official code: its gradient projection never runs (utils/utils.py tests the
parameter name `n == "module.weight"`, which no parameter has), so the official code trains plain
alternating unimodal steps; here the projection is on by default as in the paper and `projection: false`
reproduces the official behaviour. The official inference gates take the softmax over the *batch*
dimension (`F.softmax(output, dim=0)`), i.e. one entropy and one weight per modality per batch, so a
sample's prediction depends on the other samples of its batch; here the gates are per sample, as the
paper's per-input confidence. Differences from BalanceBenchmark: BB hard-codes a 512x512 projector against a 1024-d head
(here Q is sized from the real head's input width) and reads an unset `self.alpha` (here `a0`); BB adds the
projected gradient to the raw one and Frobenius-normalises P, here the gradient is replaced by its
projection as in OWM and the paper, and each modality is protected by a projector built from the other
modalities only (a single shared P would also project out a modality's own directions).

Distributed: the mean feature r is summed over processes and the gradient edit runs after the
all-reduce, so Q and the head stay identical on every rank. Refused under DeepSpeed (it edits p.grad, and
its unimodal steps leave parameters without gradients, see `zero_stages_reason`); it needs
`train.gradient_accumulation_steps: 1` (every unimodal step is an optimizer step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class MLAConfig(BalancerConfig):
    a0: float = hp(0.1, "OWM regulariser base: a = a0^(1 + batch_index / batches_per_epoch).", min=0.0, min_exclusive=True)
    projection: bool = hp(True, "Project the shared head's gradient (False: plain alternating training).")


def owm_update(q: torch.Tensor, r: torch.Tensor, a: float) -> torch.Tensor:
    """Q <- Q - (Q r)(Q r)^T / (a + r^T Q r) (Q symmetric)."""
    k = q @ r
    return q - torch.outer(k, k) / (a + r @ k)


@register
class MLA(Balancer):
    name = "mla"
    stage = "feed-forward"
    paper = "Zhang et al., CVPR 2024 (alternating unimodal adaptation, MLA)"
    find_unused_parameters = True
    # measured with projection: false: ZeRO-2 ends 2e-2 from DDP after 8 steps
    zero_stages = ()
    zero_stages_reason = ("each unimodal step leaves the other encoders without gradients: torch's AdamW skips them, "
                          "DeepSpeed's flat optimizer state still moves them by momentum and weight decay")
    config_class = MLAConfig

    def __init__(self, config=None):
        super().__init__(config)
        if not 0 < self.config.a0 < 1:
            raise ValueError(f"balance.a0 must be in (0, 1), got {self.config.a0}")
        self.needs_param_grads = self.config.projection
        self.projectors: dict = {}
        self.current = None
        self._a = self.config.a0
        self._feature_sum = None
        self.train_epoch = self._train_epoch

    def build_model(self, model_cfg, modalities, input_shapes, num_classes):
        from mmbalance_llm.models.shared_head import build_shared_head

        if model_cfg.architecture not in ("classifier", "shared_head"):
            raise ValueError(f"balance.method 'mla' builds a shared-head model from model.architecture "
                             f"'classifier' or 'shared_head', got {model_cfg.architecture!r}")
        return build_shared_head(model_cfg, modalities, input_shapes, num_classes)

    def setup(self, ctx, model):
        super().setup(ctx, model)
        if ctx.recipe.train.gradient_accumulation_steps != 1:
            raise ValueError("balance.method 'mla' takes one optimizer step per modality and batch; "
                             "set train.gradient_accumulation_steps: 1")
        head = ctx.unwrap(model).head
        d = head.in_features  # sized from the real head, never a fixed width
        if not self.projectors:
            self.projectors = {m: torch.eye(d, device=head.weight.device) for m in ctx.modalities}

    # -- one unimodal step ------------------------------------------------------------------------
    def forward(self, model, batch):
        m = self.current
        return model(modality=m, **{m: batch[m]})

    def loss(self, model, batch, outputs):
        m = self.current
        h = outputs.features[m].detach().float()
        self._feature_sum = (h.sum(0), torch.tensor(float(len(h)), device=h.device))
        loss = F.cross_entropy(outputs.logits, batch["labels"])
        return loss, {f"loss_{m}": loss.item()}

    def after_backward(self, model, step):
        if not self.config.projection:
            return
        ctx, m = self.ctx, self.current
        head = ctx.unwrap(model).head
        if head.weight.grad is not None:
            q = self.projectors[m].to(head.weight.grad.dtype)
            head.weight.grad.copy_(head.weight.grad @ q)
        total, count = (ctx.reduce_sum(t) for t in self._feature_sum)
        r = (total / count.clamp_min(1)).to(self.projectors[m].dtype)
        for k in ctx.modalities:
            if k != m:
                self.projectors[k] = owm_update(self.projectors[k], r.to(self.projectors[k].device), self._a)

    def _train_epoch(self, model, loader, epoch):
        """Every batch: one optimizer step per modality through the loop's public optimizer step; the last
        one is the loop's full training step, which also steps the schedule once per batch and does the
        logging and checkpointing."""
        ctx = self.ctx
        mods = ctx.modalities
        n = max(1, len(ctx.loaders["train"]))
        for batch in loader:
            self._a = self.config.a0 ** (1 + ctx.batches_done / n)
            for m in mods[:-1]:
                self.current = m
                ctx.optimizer_step(batch)
            self.current = mods[-1]
            ctx.training_step(batch)
            if ctx.stop_requested():
                break

    def state_dict(self):
        return {f"projector.{m}": q for m, q in self.projectors.items()}

    def load_state_dict(self, state):
        for m in list(self.projectors):
            if f"projector.{m}" in state:
                self.projectors[m] = state[f"projector.{m}"].to(self.projectors[m].device)
