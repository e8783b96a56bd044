"""`inforeg`: Information-acquisition Regulation (adaptive unimodal regulation in the prime learning window).

Huang, Wei, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition", CVPR 2025.
Stage: optimization. Not in BalanceBenchmark; the official code is two-modal with audio/visual hard-coded.

- Loss: L = CE(z) + sum_m CE(z_m) on the split-head logits (the official code's unimodal heads are replaced
  by the split head, as BalanceBenchmark does for every method).
- Information acquisition is tracked with a Fisher-information trace per modality and epoch:
  tr_m(epoch) = sum over encoder-m tensors of mean(sum over the epoch's steps of g^2), from the all-reduced
  gradients (identical on every rank).
- Prime learning window test, per modality: k_m = (tr1 - tr2) / tr1 with tr1 the mean of the last `window`
  epoch traces and tr2 the same window shifted back one epoch. k_m > `threshold` means encoder m is still
  acquiring information fast. Before two epochs of history exist, every modality counts as inside the window
  (the window opens at the start of training).
- Regulation: inside the window, a modality that is ahead (s_m > min_k s_k, s = batch mean true-class
  probability of the split logits, reduced over processes) gets the proximal gradient
  g_m += beta_m (theta - theta0) with beta_m = beta * exp(tanh(s_m - min_k s_k)), theta0 the epoch-start
  snapshot of encoder m. This slows the leading modality down so the others catch up.

Defaults: beta = 0.95, window = 10, threshold = 0.05 (official code). The official code hard-codes 0.95 for
audio and 0.1 for visual; here one `beta` applies to every modality, and `beta_per_modality` overrides it
(e.g. {visual: 0.1} reproduces the official constants).
M > 2 (our generalisation): each modality uses its own Fisher trace and the gap to the weakest modality.
The proximal term edits parameter gradients after the all-reduce, so `needs_param_grads = True`: the base
refuses DeepSpeed with a clear error. beta = 0 gives exactly `unimodal_aux` with weight 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class InfoRegConfig(BalancerConfig):
    beta: float = hp(0.95, "Proximal strength; beta_m = beta * exp(tanh(s_m - min_k s_k)). 0 disables the regulation.")
    beta_per_modality: dict = hp({}, "Per-modality override of beta, e.g. {visual: 0.1} (the official visual constant).")
    window: int = hp(10, "Number of epoch Fisher traces averaged in the prime-learning-window test.")
    threshold: float = hp(0.05, "k_m = (tr1 - tr2) / tr1 above this means modality m is in its prime learning window.")


def window_slope(traces: list, window: int) -> float:
    """k = (tr1 - tr2) / tr1, tr1 = mean of the last `window` traces, tr2 = the window one epoch earlier.
    With fewer than two traces the window is open: +inf."""
    if len(traces) < 2:
        return math.inf
    w = min(window, len(traces) - 1)
    tr1 = sum(traces[-w:]) / w
    tr2 = sum(traces[-w - 1:-1]) / w
    return (tr1 - tr2) / tr1 if tr1 > 0 else 0.0


@register
class InfoReg(Balancer):
    name = "inforeg"
    stage = "optimization"
    paper = "Huang et al., Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition, CVPR 2025"
    requires_unimodal_logits = True
    needs_param_grads = True
    config_class = InfoRegConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if c.window < 1:
            raise ValueError(f"balance.window must be >= 1, got {c.window}")
        if not isinstance(c.beta_per_modality, dict):
            raise ValueError(f"balance.beta_per_modality must be a mapping modality -> beta, got {c.beta_per_modality!r}")
        self.traces: dict = {}        # modality -> list of per-epoch Fisher traces
        self.fisher: dict = {}        # modality -> {param name: running sum of g^2 this epoch}
        self.anchor: dict = {}        # param name -> theta0 (epoch-start snapshot)
        self.in_window: dict = {}
        self._betas: dict = {}

    def setup(self, ctx, model):
        super().setup(ctx, model)
        unknown = set(self.config.beta_per_modality) - set(ctx.modalities)
        if unknown:
            raise ValueError(f"balance.beta_per_modality names unknown modalities {sorted(unknown)} (modalities: {ctx.modalities})")
        for m in ctx.modalities:
            self.traces.setdefault(m, [])

    def _params(self, model, m):
        return [(n, p) for n, p in self.ctx.unwrap(model).modality_parameters(m) if p.requires_grad]

    def on_epoch_start(self, model, epoch):
        for m in self.ctx.modalities:
            self.in_window[m] = window_slope(self.traces[m], self.config.window) > self.config.threshold
        self.anchor = {n: p.detach().clone() for m in self.ctx.modalities for n, p in self._params(model, m)}
        self.fisher = {m: {} for m in self.ctx.modalities}

    def loss(self, model, batch, outputs):
        labels = batch["labels"]
        uni = {m: F.cross_entropy(z, labels) for m, z in outputs.unimodal_logits.items()}
        loss = F.cross_entropy(outputs.logits, labels) + sum(uni.values())
        mods = self.ctx.modalities
        with torch.no_grad():
            probs = torch.stack([torch.softmax(outputs.unimodal_logits[m].float(), -1).gather(1, labels[:, None]).sum()
                                 for m in mods])
            stats = self.ctx.reduce_sum(torch.cat([probs, probs.new_tensor([len(labels)])]))
            scores = (stats[:-1] / stats[-1]).cpu()
        gap = scores - scores.min()
        self._betas = {}
        for m, g in zip(mods, gap.tolist()):
            beta = float(self.config.beta_per_modality.get(m, self.config.beta))
            if beta != 0 and g > 0 and self.in_window.get(m, True):
                self._betas[m] = beta * math.exp(math.tanh(g))
        logs = {f"loss_{m}": v.item() for m, v in uni.items()}
        logs.update({f"inforeg_beta_{m}": self._betas.get(m, 0.0) for m in mods})
        return loss, logs

    @torch.no_grad()
    def after_backward(self, model, step):
        for m in self.ctx.modalities:
            named = [(n, p) for n, p in self._params(model, m) if p.grad is not None]
            if not named:
                continue
            names, grads = [n for n, _ in named], [p.grad for _, p in named]
            acc = self.fisher.setdefault(m, {})
            device = grads[0].device
            for store in (acc, self.anchor):  # state restored from a checkpoint arrives on the CPU
                for n in names:
                    if n in store and store[n].device != device:
                        store[n] = store[n].to(device)
            if all(n in acc for n in names):  # one fused pass per modality instead of one op per tensor
                torch._foreach_addcmul_([acc[n] for n in names], grads, grads)
            else:
                for n, g in zip(names, grads):
                    acc[n] = g.float().square()
            beta = self._betas.get(m)
            if beta is not None:
                drift = torch._foreach_sub([p.detach() for _, p in named], [self.anchor[n] for n in names])
                torch._foreach_add_(grads, drift, alpha=beta)

    def on_epoch_end(self, model, epoch):
        for m in self.ctx.modalities:
            acc = self.fisher.get(m, {})
            self.traces[m].append(float(sum(v.mean() for v in acc.values())) if acc else 0.0)

    def state_dict(self):
        state = {"traces": self.traces, "in_window": self.in_window}
        state.update({f"anchor.{n}": t.clone().contiguous().cpu() for n, t in self.anchor.items()})
        for m, acc in self.fisher.items():
            state.update({f"fisher.{m}.{n}": t.clone().contiguous().cpu() for n, t in acc.items()})
        return state

    def load_state_dict(self, state):
        self.traces = {m: list(v) for m, v in state.get("traces", {}).items()}
        self.in_window = dict(state.get("in_window", {}))
        self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
        self.fisher = {}
        for k, v in state.items():
            if k.startswith("fisher."):
                m, n = k[len("fisher."):].split(".", 1)
                self.fisher.setdefault(m, {})[n] = v
