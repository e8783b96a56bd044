"""`commit`: CoMMIT, coordinated learning of the feature-side learner and the LLM learner of an MLLM.

Paper: Li, Wu, Yu, Wang, Chen, Gu, Yao, McAuley, Shang, "CoMMIT: Coordinated Multimodal Instruction Tuning"
(arXiv 2407.20454, EMNLP 2025; ICLR 2025 submission title "CoMMIT: Coordinated Instruction Tuning for
Multimodal Large Language Models"). Follows: paper only, no official code was found. The paper's equations
could not be read in the stored copies (only its abstract, introduction, reviews and summaries), so the three
parts below are built from what the paper states: the balance coefficient is a ratio of two KL divergences
between the MLLM's generation distributions before and after an update (its Eq. 3), the learning-rate
scheduler reads it every L_lr steps from a running mean, and the regulariser pushes each update to move the
generation distribution (larger steps) without labels. The exact forms and all defaults are this toolkit's.

Stage: optimization. Task: sft. Learners: the **feature side** theta (the projector and any trainable tower
parameter: ``model.freeze.projector: false`` and / or ``tower: false``) and the **LLM** phi (the adapter on the
language model); the split comes from the parameter names (models/modality_map.py, e.g. LLaVA and Qwen2-Audio:
``multi_modal_projector`` / ``vision_tower`` / ``audio_tower`` vs ``language_model``). A recipe with no trainable
feature-side parameter, or none on the LLM side, is refused at setup in one line, before anything is written.

Per measured step t+1 (``measure_every``), from the parameters before (theta_t, phi_t) and after
(theta_{t+1}, phi_{t+1}) the last optimizer update, on the current batch, with three no-grad forwards in eval
mode (no dropout, no random draw) over the answer-predicting positions (``labels != -100``):

    S_t = KL(p(theta_{t+1}, phi_t) || p(theta_t, phi_t))        the change made by the feature side alone
    J_t = KL(p(theta_{t+1}, phi_{t+1}) || p(theta_t, phi_t))    the change made by the joint update
    kappa_t = S_t / J_t                                          ~1: feature side dominates, ~0: the LLM does

(KL per position, summed over positions and processes with ``ctx.reduce_sum`` before the ratio, so every rank
gets the same kappa; T_t = KL(p(theta_{t+1}, phi_{t+1}) || p(theta_{t+1}, phi_t)), the LLM's own step, is logged.)

Dynamic learning rates: every ``lr_update_every`` steps (L_lr), with kbar the mean kappa since the last update
(measured under the current factors f) and r0 = [kbar / (1 - kbar)] / [target / (1 - target)] * (f_llm / f_feature)^2
the feature side's odds at equal rates (> 1: it learns faster than wanted; the square: a small step's KL grows
with the square of its size),

    lr_feature = lr * clamp(r0 ** (-strength / 4)),   lr_llm = lr * clamp(r0 ** (strength / 4))

(strength 1: the rates under which kappa would be the target; clamped to [min_factor, max_factor]; a rule on kbar
alone, without dividing out the current factors, swings between the two learners: measured. The factors multiply the scheduled rate of each learner's parameter groups
through ``ctx.set_lr_factors``, so warm-up and decay still apply; under AdamW only a rate change changes the
step size, a gradient scale would not). Regulariser, on measured steps: L = L_LM - aux_weight *
mean KL(p(theta, phi) || sg p(theta_t, phi_t)) over the answer-predicting positions (the training forward against
the previous parameters' distribution): it rewards moving the generation distribution, against vanishing steps.

``schedule_strength: 0`` and ``aux_weight: 0`` run no extra forward and change nothing: the plain run, bit for bit.
Deviations (the paper's forms could not be checked): kappa's exact normalisation, the odds-ratio schedule with its
square-law correction and clamp and the KL form of the regulariser are this module's; the paper tunes LoRA on BLIP-2 / InstructBLIP-style
models with a trainable feature encoder, here the feature side is what the recipe unfreezes (usually the projector).
Cost: on a measured step, three no-grad forwards and a copy of the trainable parameters (one more copy is kept
between steps and saved in checkpoints while pending, so a resumed run measures exactly as the uninterrupted one).
DeepSpeed is refused: the rate factors act on the torch optimizer's parameter groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance._mllm import IGNORE
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp

LEARNERS = ("feature", "llm")
PREV = "prev/"  # key prefix of the pending parameter snapshot in the balancer state


@dataclass
class CoMMITConfig(BalancerConfig):
    schedule_strength: float = hp(1.0, "Strength of the coordinated learning rates: the factors are the feature "
                                       "side's odds at equal rates to the power -/+ strength/4 (1: the rates that "
                                       "would give target_kappa; 0: learning rates untouched).", min=0.0)
    aux_weight: float = hp(0.1, "Weight of the regulariser that rewards moving the generation distribution away "
                                "from the previous step's (0: no regulariser).", min=0.0)
    target_kappa: float = hp(0.5, "The balanced value of kappa = S/J (the feature side's share of the change).",
                             min=0.01, max=0.99)
    lr_update_every: int = hp(10, "L_lr: update the learning-rate factors every this many optimizer steps, from the "
                                  "mean kappa measured since the last update.", min=1)
    measure_every: int = hp(1, "Measure kappa (and add the regulariser) every this many optimizer steps.", min=1)
    min_factor: float = hp(0.1, "Smallest learning-rate factor.", min=0.0, min_exclusive=True)
    max_factor: float = hp(10.0, "Largest learning-rate factor.", min=1.0)


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-softmax (float32) at the positions that predict an answer token: [N, V]."""
    return F.log_softmax(logits[:, :-1][labels[:, 1:] != IGNORE].float(), -1)


def kl_sum(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum over positions of KL(P || Q), from log-probabilities [N, V]."""
    return (lp.exp() * (lp - lq)).sum()


def balance_coefficient(s: float, j: float) -> float | None:
    """kappa = S / J; None when the joint update did not move the distribution (e.g. a zero warm-up rate)."""
    return s / j if j > 1e-12 else None


def lr_factors(kbar: float, target: float, strength: float, low: float, high: float, current: dict) -> dict:
    """The factors that bring kappa to the target. A small step's KL grows with the square of its size, so under
    the current factors the odds kappa/(1-kappa) are r0 * (f_feature / f_llm)^2, r0 the odds at equal rates (to
    the target's odds); the new factors are f_feature = r0^(-strength/4), f_llm = r0^(strength/4), clamped to
    [low, high] (strength 1: the step sizes that give the target)."""
    k = min(max(kbar, 1e-3), 1 - 1e-3)
    log_r0 = (math.log(k / (1 - k)) - math.log(target / (1 - target))
              + 2 * (math.log(current["llm"]) - math.log(current["feature"])))
    return {"feature": min(max(math.exp(-strength / 4 * log_r0), low), high),
            "llm": min(max(math.exp(strength / 4 * log_r0), low), high)}


@register
class CoMMIT(Balancer):
    name = "commit"
    stage = "optimization"
    paper = ("CoMMIT (Li, Wu et al., EMNLP 2025): a balance coefficient between the feature side's and the LLM's "
             "learning steps sets their learning rates; a regulariser rewards larger steps.")
    tasks = ("sft",)
    zero_stages = ()
    zero_stages_reason = "its learning-rate factors act on the torch optimizer's parameter groups"
    config_class = CoMMITConfig

    def setup(self, ctx, model) -> None:
        super().setup(ctx, model)
        from mmbalance_llm.train.setup import learner_of

        net = ctx.unwrap(model)
        which = learner_of(net)
        if which is None:
            raise ValueError("balance.method 'commit' needs an HF multimodal LLM (task sft with a supported model)")
        self.params = {k: [] for k in LEARNERS}
        for n, p in net.named_parameters():
            if p.requires_grad and which(n) in self.params:
                self.params[which(n)].append((n, p))
        if not self.params["feature"]:
            raise ValueError("balance.method 'commit' needs a trainable feature-side learner, but the recipe freezes "
                             "it: set model.freeze.projector: false (or model.freeze.tower: false)")
        if not self.params["llm"]:
            raise ValueError("balance.method 'commit' needs a trainable LLM learner: choose adapter lora or moka")
        if ctx.set_lr_factors is None:
            raise ValueError("balance.method 'commit' needs the training loop's set_lr_factors service")
        c = self.config
        self.active = c.schedule_strength > 0 or c.aux_weight > 0
        self.factors = {k: 1.0 for k in LEARNERS}
        self.window: list = []  # kappas measured since the last learning-rate update
        self.prev, self.prev_step, self.seen_step = None, None, None
        self._pending = None

    # -- parameters of the two learners --------------------------------------------------------
    def _named(self, learners=LEARNERS):
        return [np for k in learners for np in self.params[k]]

    @torch.no_grad()
    def _assign(self, values: dict, learners=LEARNERS) -> None:
        for n, p in self._named(learners):
            p.copy_(values[n])

    @torch.no_grad()
    def _measure(self, net, batch):
        """Answer log-probs (old, feature-only, new) on this batch: three no-grad forwards in eval mode."""
        labels, cur = batch["labels"], {n: p.detach().clone() for n, p in self._named()}
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        try:
            new = answer_logprobs(net(**batch).logits, labels)
            self._assign(self.prev, ("llm",))  # theta_{t+1}, phi_t
            feat = answer_logprobs(net(**batch).logits, labels)
            self._assign(self.prev, ("feature",))  # theta_t, phi_t
            old = answer_logprobs(net(**batch).logits, labels)
        finally:
            self._assign(cur)
            for m, training in modes:
                m.training = training
        return old, feat, new

    # -- per step -------------------------------------------------------------------------------
    def forward(self, model, batch):
        self._pending = None
        step = self.ctx.global_step
        if not self.active or step == self.seen_step:  # off, or a later micro-batch of the same optimizer step
            return super().forward(model, batch)
        self.seen_step = step
        every = self.config.measure_every
        if step % every == 0 and self.prev is not None and self.prev_step == step - 1:
            # the no-grad forwards run first: the training forward must be the model's last (MokA keeps its masks)
            self._pending = self._measure(self.ctx.unwrap(model), batch)
        self.prev, self.prev_step = None, None
        if (step + 1) % every == 0:  # the next step measures the update this step makes
            self.prev, self.prev_step = {n: p.detach().clone() for n, p in self._named()}, step
        return super().forward(model, batch)

    def loss(self, model, batch, outputs):
        loss, logs = super().loss(model, batch, outputs)
        measured, self._pending = self._pending, None
        if measured is None:
            return loss, logs
        c, logs = self.config, dict(logs)
        old, feat, new = measured
        stats = torch.stack([kl_sum(feat, old), kl_sum(new, feat), kl_sum(new, old),
                             torch.tensor(float(len(old)), device=old.device)]).double()
        s, t, j, n = self.ctx.reduce_sum(stats).tolist()  # every rank joins: same steps, same order
        if n > 0:
            logs.update(kl_feature=s / n, kl_llm=t / n, kl_joint=j / n)
            kappa = balance_coefficient(s, j)
            if kappa is not None:
                self.window.append(kappa)
                logs["kappa"] = kappa
        step = self.ctx.global_step
        if c.schedule_strength > 0 and (step + 1) % c.lr_update_every == 0 and self.window:
            kbar = sum(self.window) / len(self.window)
            self.window = []
            self.factors = lr_factors(kbar, c.target_kappa, c.schedule_strength, c.min_factor, c.max_factor,
                                      self.factors)
            self.ctx.set_lr_factors(self.factors)  # this step's optimizer update already uses them
        if c.schedule_strength > 0:
            logs.update(lr_factor_feature=self.factors["feature"], lr_factor_llm=self.factors["llm"])
        if c.aux_weight > 0 and len(old):
            aux = kl_sum(answer_logprobs(outputs.logits, batch["labels"]), old) / len(old)
            logs["commit_aux"] = aux.item()
            loss = loss - c.aux_weight * aux
        return loss, logs

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"factors": dict(self.factors), "window": list(self.window), "prev_step": self.prev_step,
                 "seen_step": self.seen_step}
        if self.prev is not None:  # a snapshot the next step needs
            state.update({PREV + n: v for n, v in self.prev.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        self.factors = {k: float(v) for k, v in state.get("factors", self.factors).items()}
        self.window = [float(v) for v in state.get("window", [])]
        self.prev_step, self.seen_step = state.get("prev_step"), state.get("seen_step")
        device = {n: p.device for n, p in self._named()}
        prev = {k[len(PREV):]: v.to(device[k[len(PREV):]]) for k, v in state.items() if k.startswith(PREV)}
        self.prev = prev or None
        if any(f != 1.0 for f in self.factors.values()):
            self.ctx.set_lr_factors(self.factors)  # the factored rates are in the optimizer state; re-applied
