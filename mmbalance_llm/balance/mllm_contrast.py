"""`mllm_contrast`: the LM loss plus a hinge on the margin between the answer's log-probability with and
without each media modality (the MLLM analogue of `unimodal_aux`).

Stage: objective. Task: sft. Per step and per media modality m present in the batch, one extra forward of the
same batch with m removed (``removal: blank`` zeroes m's pixel / log-mel input and keeps its placeholder tokens;
``drop`` removes the placeholders and the media tensor). For every sample that has m's tokens,

    margin_m = mean answer-token log p(y | x) - mean answer-token log p(y | x without m)
    L = L_LM + weight * mean_samples max(0, target_margin - margin_m)      (averaged over the modalities)

Gradients flow through both forwards (``detach_without: true`` stops them in the removed forward, so only the
full forward is pushed up). ``blank`` is the default: the model cannot meet the margin by just detecting that
the placeholder tokens are missing, it has to read the media features, and the sequence layout stays the same
(MokA's masks and gradient checkpointing are unaffected). ``weight: 0`` runs no extra forward and reproduces
the plain run bit for bit.

Follows: paper only (no MLLM paper defines this exact term; it is the contrastive "with vs without the image"
margin of visual-contrastive decoding turned into a training objective, used here as the MLLM counterpart of the
unimodal auxiliary loss). Defaults are this toolkit's, not a paper's. Cost: one extra forward and backward per
media modality and step (``every_n_steps: k`` adds the term on every k-th optimizer step only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmbalance_llm.balance import register
from mmbalance_llm.balance._mllm import REMOVALS, answer_logprob, media_modalities, without
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class MLLMContrastConfig(BalancerConfig):
    weight: float = hp(0.1, "Weight of the margin hinge added to the LM loss (0: the plain run, no extra forward).", min=0.0)
    target_margin: float = hp(1.0, "Wanted gap (nats per answer token) between the answer's mean log-prob with and "
                                   "without the modality; samples above it add nothing.")
    removal: str = hp("blank", "How the modality is removed in the extra forward: 'blank' (media tensor zeroed, "
                               "placeholders kept) or 'drop' (placeholders and media removed).", choices=REMOVALS)
    detach_without: bool = hp(False, "Stop the gradient through the forward without the modality.")
    every_n_steps: int = hp(1, "Add the term on every this many optimizer steps only (1: every step; larger: cheaper, "
                               "the other steps run no extra forward).", min=1)


@register
class MLLMContrast(Balancer):
    name = "mllm_contrast"
    stage = "objective"
    paper = "Modality-contrast objective for MLLM fine-tuning: hinge on log p(answer | media) - log p(answer | no media)."
    tasks = ("sft",)
    config_class = MLLMContrastConfig

    def setup(self, ctx, model) -> None:
        super().setup(ctx, model)
        c = self.config  # ranges and choices: declared on the config fields, checked when the recipe is read
        r = ctx.recipe
        if c.removal == "drop" and r.adapter == "moka" and r.model.gradient_checkpointing and not c.detach_without:
            # checkpointed MokA layers recompute with the masks of the last forward, which has another layout
            raise ValueError("balance.removal=drop with adapter moka and model.gradient_checkpointing needs "
                             "balance.detach_without=true (or removal=blank)")
        self._pending = None

    def forward(self, model, batch):
        c = self.config
        self._pending = None
        if c.weight == 0 or self.ctx.global_step % c.every_n_steps:
            return super().forward(model, batch)
        from mmbalance_llm.models.modality_map import modality_masks

        net = self.ctx.unwrap(model)
        masks = modality_masks(batch, net)
        removed = {}
        # the removed forwards run first, so the model's last forward (whose masks MokA keeps) is the full batch
        for m in media_modalities(batch, masks):
            b = without(batch, m, net, c.removal)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not c.detach_without):
                lp, n = answer_logprob(net(**b).logits, b["labels"])
            removed[m] = (lp / n.clamp_min(1), masks[m].any(1) & (n > 0))
        self._pending = removed
        return super().forward(model, batch)

    def loss(self, model, batch, outputs):
        loss, logs = super().loss(model, batch, outputs)
        removed, self._pending = self._pending, None
        if not removed:
            return loss, logs
        lp, n = answer_logprob(outputs.logits, batch["labels"])
        full = lp / n.clamp_min(1)
        terms, logs = [], dict(logs)
        for m, (lp_without, has) in removed.items():
            if not bool(has.any()):
                continue
            margin = (full - lp_without)[has]
            hinge = torch.relu(self.config.target_margin - margin)
            terms.append(hinge.mean())
            # logged over the whole global batch (summed over processes), so a log does not depend on the split
            tot = self.ctx.reduce_sum(torch.stack([margin.sum(), hinge.sum(), torch.tensor(float(len(margin)),
                                                                                   device=margin.device)]).detach())
            logs[f"margin_{m}"] = float(tot[0] / tot[2])
            logs.setdefault("_hinge", []).append(float(tot[1] / tot[2]))
        hinges = logs.pop("_hinge", [])
        if not terms:
            return loss, logs
        aux = torch.stack(terms).mean()
        logs["contrast_loss"] = sum(hinges) / len(hinges)
        return loss + self.config.weight * aux, logs
