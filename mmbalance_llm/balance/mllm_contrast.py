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
        if removed is None:  # weight 0 or a step between terms: the same on every rank
            return loss, logs
        lp, n = answer_logprob(outputs.logits, batch["labels"])
        full = lp / n.clamp_min(1)
        # logged over the global batch: one reduction in a fixed modality order, joined by every rank even when its
        # own batch lacks a medium (a rank that skipped it would leave the others waiting)
        media = [m for m in self.ctx.modalities if m != "text"]
        stats = torch.zeros(3 * len(media), dtype=torch.float64, device=full.device)
        terms = []
        for i, m in enumerate(media):
            if m not in removed or not bool(removed[m][1].any()):
                continue
            lp_without, has = removed[m]
            margin = (full - lp_without)[has]
            hinge = torch.relu(self.config.target_margin - margin)
            terms.append(hinge.mean())
            stats[3 * i:3 * i + 3] = torch.stack([margin.sum(), hinge.sum(), has.sum()]).detach().double()
        stats = self.ctx.reduce_sum(stats).tolist()
        logs, hinges = dict(logs), []
        for i, m in enumerate(media):
            margin_sum, hinge_sum, count = stats[3 * i:3 * i + 3]
            if count:
                logs[f"margin_{m}"] = margin_sum / count
                hinges.append(hinge_sum / count)
        if hinges:
            logs["contrast_loss"] = sum(hinges) / len(hinges)
        if not terms:
            return loss, logs
        return loss + self.config.weight * torch.stack(terms).mean(), logs
