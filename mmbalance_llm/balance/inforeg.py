"""`inforeg`: Information-acquisition Regulation (adaptive unimodal regulation in the prime learning window).

Huang, Wei, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition", CVPR 2025.
Stage: optimization. Not in BalanceBenchmark.
Follows: GeWu-Lab/InfoReg_CVPR2025@939b2ed11dcbf4daddb2507157b2cb9f8d0e24d7:main.py (`train_epoch`).
Defaults are the official CREMA-D script's (batch 64, 0.95 / 0.1, window 10, threshold 0.05).

- Loss: L = CE(z) + sum_m CE(z_m) on the split-head logits (the official code also uses the split head,
  W[:, S_m] h_m + b/2, for its unimodal losses).
- Information acquisition: a Fisher-information trace per modality and epoch,
  tr_m(epoch) = sum over encoder-m weight tensors (dim >= 2, the official Conv2d/Linear weights) of
  mean(sum over the epoch's steps of g^2), with g the gradient *after* the proximal term was added (the
  official order), from the all-reduced gradients (identical on every rank).
- Prime learning window test: the trace history starts with `window` zeros (the official list of ten
  zeros), tr1 = sum of the last `window` traces / window, tr2 = the same window one epoch earlier, and
  k = (tr1 - tr2) / tr1 (k = 1 in epoch 0). k > `threshold` keeps the window open. By default
  (`window_source: reference`) the test reads the history of the reference modality (the first one, the
  official audio) and applies to every modality; `window_source: own` gives each modality its own test.
- Regulation: inside the window, a modality that is ahead (s_m > min_k s_k, s = **batch sum** of the
  true-class probability of the split logits, summed over processes, i.e. over the global batch) gets the
  proximal gradient g_m += beta_m (theta - theta0) with beta_m = b_m * exp(tanh(s_m - min_k s_k)), theta0
  the epoch-start snapshot of encoder m. b_m = `beta` (0.95) for the reference modality and `beta_other`
  (0.1) for every other one, the official audio / visual constants; `beta_per_modality` overrides both.

Differences from the official code:
- the unimodal logits come from the model's split head for any encoder; M > 2 (our generalisation):
  each non-minimum modality is regulated against the weakest one, with `beta_other`;
- the official also accumulates its Fisher sum over head weights and logs per-loss gradients (extra
  backward passes); only the encoder traces are used by the method, so only those are kept;
- the official's `k` is computed from zero-padded history exactly as here, but it only exists for audio;
  `window_source: own` is our extension;
- the proximal term edits parameter gradients after the all-reduce, so `needs_param_grads = True`: the
  base refuses DeepSpeed with a clear error. beta = beta_other = 0 gives exactly `unimodal_aux` with weight 1.
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
    beta: float = hp(0.95, "Proximal strength of the reference modality (official audio constant); "
                           "beta_m = b_m * exp(tanh(s_m - min_k s_k)). 0 disables it.", min=0.0)
    beta_other: float = hp(0.1, "Proximal strength of every other modality (official visual constant).", min=0.0)
    beta_per_modality: dict = hp({}, "Per-modality override of beta / beta_other, e.g. {visual: 0.1}.")
    window: int = hp(10, "Number of epoch Fisher traces in the prime-learning-window test (history starts with this many zeros).", min=1)
    threshold: float = hp(0.05, "k = (tr1 - tr2) / tr1 above this means the prime learning window is open.", min=0.0)
    window_source: str = hp("reference", "'reference': the first modality's Fisher history opens or closes the window of "
                                         "every modality (official, audio); 'own': each modality uses its own history.")


def window_slope(traces: list, window: int) -> float:
    """k = (tr1 - tr2) / tr1 over the history padded with `window` leading zeros (the official list of ten
    zeros): tr1 = sum of the last `window` traces / window, tr2 = the window one epoch earlier. No history
    (epoch 0): k = 1, the window is open."""
    if not traces:
        return 1.0
    padded = [0.0] * window + list(traces)
    tr1 = sum(padded[-window:]) / window
    tr2 = sum(padded[-window - 1:-1]) / window
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
        if c.window_source not in ("reference", "own"):
            raise ValueError(f"balance.window_source must be 'reference' or 'own', got {c.window_source!r}")
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

    def base_beta(self, m) -> float:
        c = self.config
        default = c.beta if m == self.ctx.modalities[0] else c.beta_other
        return float(c.beta_per_modality.get(m, default))

    def on_epoch_start(self, model, epoch):
        c, mods = self.config, self.ctx.modalities
        for m in mods:
            source = mods[0] if c.window_source == "reference" else m
            self.in_window[m] = window_slope(self.traces[source], c.window) > c.threshold
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
            # Batch sums over the global batch, as the official score_a / score_v (not means).
            scores = self.ctx.reduce_sum(probs).cpu()
        gap = scores - scores.min()
        self._betas = {}
        for m, g in zip(mods, gap.tolist()):
            beta = self.base_beta(m)
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
            beta = self._betas.get(m)
            if beta is not None:  # the proximal term first: the official Fisher sum sees the edited gradient
                drift = torch._foreach_sub([p.detach() for _, p in named], [self.anchor[n] for n in names])
                torch._foreach_add_(grads, drift, alpha=beta)
            weights = [(n, g) for n, g in zip(names, grads) if g.dim() >= 2]  # Conv/Linear weights only
            if not weights:
                continue
            w_names, w_grads = [n for n, _ in weights], [g for _, g in weights]
            if all(n in acc for n in w_names):  # one fused pass per modality instead of one op per tensor
                torch._foreach_addcmul_([acc[n] for n in w_names], w_grads, w_grads)
            else:
                for n, g in weights:
                    acc[n] = g.float().square()

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
