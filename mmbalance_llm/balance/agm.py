"""`agm`: Adaptive Gradient Modulation.

Li, Li, Hu, Yang, Xie, Zhu, Tang, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023. Stage: optimization.
Follows: lihong2303/AGM_ICCV2023@5a65542c70b1c7c15c5df291e77fa9cf2bbb9549:run/CREMAD_main.py (`train`, the CREMA-D
setting: exponent clip 10; run/URFunny_main.py clips at 7).

Per step:
1. Shapley unimodal logits. f(S) is the fused logits with the inputs outside S zero-padded. For every m,
   phi_m = sum_{S subset of M minus m} w_|S| [f(S + m) - f(S)], w_k = k!(M-k-1)!/M!, **including S = empty**
   (the paper's sum; BalanceBenchmark drops that term). With `empty_set: zero` (default, as the original
   code, whose audio term is 1/2 (f(av) - f(v) + f(a))) f(empty) := 0, so sum_m phi_m = f(M) exactly;
   `empty_set: padded` uses the fused output of an all-zero input instead.
2. s_m = mean_i CE(phi_m,i, y_i) over the batch of every process (reduced), no gradient.
3. ratio_m = exp(mean_{k != m} s_k - s_m) (for M = 2: exp(s_other - s_m), large when m dominates), and the
   target ratio*_m is the same expression of the running means of s over all previous steps.
4. c_m = exp(alpha * min(ratio*_m - ratio_m, max_exponent)) (clip 10, as the CREMA-D script); encoder m's
   gradient is multiplied by c_m. The loss is the
   plain fused cross-entropy. The running means then absorb this step's s.

Efficiency: zero input on modality m only changes h_m into encoder_m(0), a constant. So f(S) for the
2^M - 2 proper non-empty subsets is one re-fusion of the already computed features (h_m for m in S,
encoder_m(0) broadcast otherwise), batched into one `fuse` call, plus one forward of every encoder on a
single zero sample; f(M) is the training forward itself. This is
exact whenever an encoder treats samples independently (no dropout in train mode, no batch statistics);
with dropout the zero-sample pass draws its own mask, which is as valid a sample as the padded batch's.

Defaults: alpha = 1.5 (original CREMA-D setting; BalanceBenchmark uses 0.1), modulation on every epoch.
M > 2: supported, over all 2^M subsets (exact Shapley weights); cost grows as 2^M re-fusions, not encoders.
Differences from the reference code, on purpose: the empty-set term is included; the scaling acts on the
gradient flowing into h_m (a tensor hook), which scales exactly encoder m's parameters and works under
DDP/DeepSpeed; the original's "clip grad norm to 5 when a head grad exceeds 5" is left to `train.grad_clip`;
the original floors each true-class probability at 1e-8 inside the score (-log p <= 18.4), here the score is the
plain cross-entropy.
BalanceBenchmark (balancemm/trainer/AGM_trainer.py) uses the opposite sign of the ratio,
exp(M/(M-1) (s_m - mean_k s_k)), so it speeds up the modality the original slows down; this module keeps the
original sign. alpha = 0 reproduces the baseline exactly.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp
from mmbalance_llm.balance.common import scale_feature_grad


@dataclass
class AGMConfig(BalancerConfig):
    alpha: float = hp(1.5, "Modulation strength alpha in c_m = exp(alpha * min(ratio*_m - ratio_m, max_exponent)). 0 disables it.", min=0.0)
    empty_set: str = hp("zero", "Value of f(empty set) in the Shapley sum: 'zero' (original code) or 'padded' "
                                "(the fused output of an all-zero input).")
    max_exponent: float = hp(10.0, "Upper clip of ratio*_m - ratio_m before the exponential (original CREMA-D "
                                   "script: 10; its URFunny script: 7).", min=0.0)


def shapley_weights(num_modalities: int) -> list:
    """w_k = k!(M-k-1)!/M! for a coalition of size k not containing the modality."""
    m = num_modalities
    return [math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m) for k in range(m)]


def subset_logits(fuse, features: dict, zero_features: dict, modalities: list, full=None) -> dict:
    """f(S) for every non-empty subset S (a frozenset), by re-fusing the given features: h_m for m in S,
    encoder_m(0) broadcast over the batch otherwise. One batched `fuse` call, no gradient. `full`, the
    logits of the real forward, stands for S = all modalities when given (one subset fewer to fuse)."""
    top = len(modalities) if full is None else len(modalities) - 1
    subsets = [frozenset(c) for k in range(1, top + 1) for c in itertools.combinations(modalities, k)]
    batch = len(next(iter(features.values())))
    with torch.no_grad():
        stacked = {m: torch.cat([features[m].detach() if m in s else zero_features[m].expand_as(features[m])
                                 for s in subsets]) for m in modalities}
        values = dict(zip(subsets, fuse(stacked).logits.split(batch))) if subsets else {}
    if full is not None:
        values[frozenset(modalities)] = full.detach()
    return values


def shapley_logits(values: dict, modalities: list, empty_value: torch.Tensor) -> dict:
    """phi_m = sum over S not containing m (empty set included) of w_|S| [f(S + m) - f(S)]."""
    weights = shapley_weights(len(modalities))
    phi = {}
    for m in modalities:
        others = [k for k in modalities if k != m]
        total = 0
        for k in range(len(others) + 1):
            for c in itertools.combinations(others, k):
                s = frozenset(c)
                total = total + weights[k] * (values[s | {m}] - (values[s] if s else empty_value))
        phi[m] = total
    return phi


def agm_coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float, max_exponent: float = 10.0):
    """c_m = exp(alpha * min(ratio*_m - ratio_m, max_exponent)), ratio_m = exp(mean_{k!=m} s_k - s_m)."""
    def ratio(s):
        m = len(s)
        return torch.exp((s.sum() - s) / max(1, m - 1) - s) if m > 1 else torch.ones_like(s)

    return torch.exp(alpha * torch.clamp(ratio(running) - ratio(scores), max=max_exponent))


@register
class AGM(Balancer):
    name = "agm"
    stage = "optimization"
    paper = "Li et al., Boosting Multi-modal Model Performance with Adaptive Gradient Modulation, ICCV 2023"
    config_class = AGMConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.empty_set not in ("zero", "padded"):
            raise ValueError(f"balance.empty_set must be 'zero' or 'padded', got {self.config.empty_set!r}")
        self.score_sum = None  # running sums of s_m over steps, for the target ratio
        self.steps = 0

    def setup(self, ctx, model):
        super().setup(ctx, model)
        if self.score_sum is None:
            self.score_sum = torch.zeros(len(ctx.modalities), dtype=torch.float64)

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        loss = F.cross_entropy(outputs.logits, labels)
        mods = self.ctx.modalities
        net = self.ctx.unwrap(model)
        with torch.no_grad():
            zero = net.encode(**{m: torch.zeros_like(batch[m][:1]) for m in mods})
            values = subset_logits(net.fuse, outputs.features, zero, mods, full=outputs.logits)
            empty = 0.0 if self.config.empty_set == "zero" else net.fuse(zero).logits
            phi = shapley_logits(values, mods, empty)
            stacked = torch.stack([phi[m] for m in mods]).float()  # [M, B, C]: one cross-entropy call
            ce = F.cross_entropy(stacked.flatten(0, 1), labels.repeat(len(mods)), reduction="none")
            ce = ce.view(len(mods), -1).sum(1)
            stats = self.ctx.reduce_sum(torch.cat([ce, ce.new_tensor([len(labels)])]))
            scores = (stats[:-1] / stats[-1]).double().cpu()
        running = self.score_sum / self.steps if self.steps else torch.zeros_like(scores)
        coeffs = agm_coefficients(scores, running, self.config.alpha, self.config.max_exponent)
        self.score_sum += scores
        self.steps += 1
        scale_feature_grad(outputs.features, dict(zip(mods, coeffs.tolist())))
        logs = {f"agm_coeff_{m}": float(c) for m, c in zip(mods, coeffs)}
        logs.update({f"agm_score_{m}": float(s) for m, s in zip(mods, scores)})
        return loss, logs

    def state_dict(self):
        return {"score_sum": self.score_sum.tolist() if self.score_sum is not None else None, "steps": self.steps}

    def load_state_dict(self, state):
        if state.get("score_sum") is not None:
            self.score_sum = torch.tensor(state["score_sum"], dtype=torch.float64)
        self.steps = int(state.get("steps", 0))
