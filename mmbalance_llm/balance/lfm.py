"""`lfm`: dynamically Learning the modality gap (fused CE + unimodal alignment, learned mixing weight).

Yang et al., "Facilitating Multimodal Classification via Dynamically Learning Modality Gap", NeurIPS 2024.
Stage: objective.
Follows: njustkmg/NeurIPS24-LFM@ad44fa09fee471c9267a7cba526b222c54d45493:Crema_epoch_learnable.py
(`Alignment`, `getAlpha_Learnable`, the CREMA-D learnable setting).

The training loss mixes the supervised fused loss with an alignment term between the modalities'
predictions, averaged over all modality pairs:

    L = 2 (alpha_0 CE(z) + alpha_1 mean_{a<b} A(softmax z_a, softmax z_b)),   alpha_0 = 1 - alpha_1.

With `alignment: official` (default) A(P, Q) = (KL(M||P) + KL(M||Q)) / 2, M = (P + Q) / 2: the official
`F.kl_div(p.log(), m)` is KL(M||P), the reverse of the textbook Jensen-Shannon divergence;
`alignment: js` gives the textbook (KL(P||M) + KL(Q||M)) / 2.

alpha_1 is learned (bi-level): once per epoch it takes one hypergradient step that lowers the held-out
classification loss after a training step. With theta' = theta - eta grad_theta L_train(alpha), the
first-order hypergradient is dL_val(theta')/d alpha_1 ~= -eta <grad L_cls^val, grad(A - CE)^train>
(d/d alpha_1 of grad L_train is grad(A) - grad(CE), up to the factor 2). So

    alpha_1 <- clip(alpha_1 + lr_alpha * <g_val, g_A - g_CE>, 0.05, 0.95)

with g_val = grad of CE on a fixed validation batch (the first `val_samples` validation samples) and g_A,
g_CE on the first `train_samples` training samples; the learning rate eta is folded into lr_alpha, which
halves every 20 epochs (from epoch 20 on, as the official `epoch % 20 == 0 and epoch != 0`). The update
reads the validation split, never test.

Defaults (official learnable script): alpha = (0.05, 0.95) at start, i.e. 0.05 on the cross-entropy and
0.95 on the alignment (`cls_k = [0.05, 0.95]`), lr_alpha = 1e-4, clip [0.05, 0.95].

Distributed: the fixed batches are read from the datasets (the same samples on every rank) and the
gradient vectors are averaged over processes before the inner product, so every rank applies the same alpha.
M > 2: supported (alignment over all pairs).

Differences from the official code:
- the official steps alpha_1 by the mean of the *first parameter tensor's* entries of a Hessian-vector
  product computed entirely on its validation batch (half of 16 training samples held out), a quantity that
  depends on parameter order; here the step is the (first-order) hypergradient of the validation loss
  w.r.t. alpha_1 over all parameters, on the validation split;
- the official fused logits are 0.5 (z_a + z_v) of separate unimodal heads; here z is the model's fused
  head (for `fusion: concat` the sum of the split logits); the alignment is computed in log space
  (the official takes log of a softmax);
- BalanceBenchmark starts from the swapped weights (0.05 on the alignment); set `alpha_init: 0.05` for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance._objective import allreduce_mean_, flatten
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs


@dataclass
class LFMConfig(BalancerConfig):
    alpha_init: float = hp(0.95, "Initial weight alpha_1 of the alignment term (official 0.95); alpha_0 = 1 - alpha_1 on the CE.", min=0.0, max=1.0)
    lr_alpha: float = hp(1e-4, "Hypergradient step size for alpha_1 (halved every `lr_decay_epochs`). 0 freezes alpha.", min=0.0)
    lr_decay_epochs: int = hp(20, "Halve lr_alpha every this many epochs.", min=1)
    alpha_min: float = hp(0.05, "Lower clip of alpha_1.", min=0.0, max=1.0)
    alpha_max: float = hp(0.95, "Upper clip of alpha_1.", min=0.0, max=1.0)
    val_samples: int = hp(64, "The first this many validation samples form the fixed hypergradient batch.", min=1)
    train_samples: int = hp(64, "The first this many training samples give the training-loss gradients.", min=1)
    alignment: str = hp("official", "'official': (KL(M||P) + KL(M||Q)) / 2 as the official code; 'js': the textbook "
                                    "Jensen-Shannon (KL(P||M) + KL(Q||M)) / 2.")


def js_divergence(za: torch.Tensor, zb: torch.Tensor, kind: str = "js") -> torch.Tensor:
    """Batch mean of the alignment between softmax(za) = P and softmax(zb) = Q, M = (P + Q) / 2:
    'js': (KL(P||M) + KL(Q||M)) / 2; 'official': (KL(M||P) + KL(M||Q)) / 2 (the official `F.kl_div(p.log(), m)`)."""
    la, lb = torch.log_softmax(za, -1), torch.log_softmax(zb, -1)
    lm = torch.logsumexp(torch.stack([la, lb]), 0) - torch.log(torch.tensor(2.0, dtype=la.dtype))
    if kind == "official":
        m = lm.exp()
        kl_a = (m * (lm - la)).sum(-1)
        kl_b = (m * (lm - lb)).sum(-1)
    else:
        kl_a = (la.exp() * (la - lm)).sum(-1)
        kl_b = (lb.exp() * (lb - lm)).sum(-1)
    return (0.5 * (kl_a + kl_b)).mean()


def alignment(unimodal: dict, kind: str = "js") -> torch.Tensor:
    pairs = list(combinations(list(unimodal), 2))
    if not pairs:
        return next(iter(unimodal.values())).sum() * 0
    return sum(js_divergence(unimodal[a], unimodal[b], kind) for a, b in pairs) / len(pairs)


@register
class LFM(Balancer):
    name = "lfm"
    stage = "objective"
    paper = "Yang et al., Facilitating Multimodal Classification via Dynamically Learning Modality Gap, NeurIPS 2024"
    requires_unimodal_logits = True
    config_class = LFMConfig
    zero_stages = (0, 1, 2)
    zero_stages_reason = "it takes validation gradients w.r.t. all parameters, which ZeRO-3 partitions"

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not 0 <= c.alpha_min <= c.alpha_init <= c.alpha_max <= 1:
            raise ValueError("balance.alpha_init must lie in [alpha_min, alpha_max] within [0, 1]")
        if c.alignment not in ("official", "js"):
            raise ValueError(f"balance.alignment must be 'official' or 'js', got {c.alignment!r}")
        if c.val_samples < 1 or c.train_samples < 1:
            raise ValueError("balance.val_samples and balance.train_samples must be >= 1")
        self.alpha1 = float(c.alpha_init)
        self.lr_alpha = float(c.lr_alpha)

    def _fixed_batch(self, name, size):
        """The first `size` samples of a split, read from the dataset itself: identical on every rank and
        without leaving a prepared loader half-iterated."""
        from mmbalance_llm.data.features import collate

        ds = self.ctx.loaders[name].dataset
        batch = collate([ds[i] for i in range(min(size, len(ds)))])
        device = self.ctx.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def hypergradient(self, model) -> float:
        """<g_val, g_JS - g_CE> averaged over processes (see the module docstring)."""
        unwrapped = self.ctx.unwrap(model)
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        mods = self.ctx.modalities
        was_training = unwrapped.training
        unwrapped.eval()  # no dropout noise in the statistic
        try:
            val = self._fixed_batch("validation", self.config.val_samples)
            out = unwrapped(**model_inputs(val, mods))
            g_val = torch.autograd.grad(F.cross_entropy(out.logits, val["labels"]), params, allow_unused=True)
            train = self._fixed_batch("train_eval", self.config.train_samples)
            out = unwrapped(**model_inputs(train, mods))
            g_ce = torch.autograd.grad(F.cross_entropy(out.logits, train["labels"]), params, retain_graph=True,
                                       allow_unused=True)
            g_js = torch.autograd.grad(alignment(out.unimodal_logits, self.config.alignment), params, allow_unused=True)
        finally:
            unwrapped.train(was_training)
        fill = lambda gs: [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, params)]  # noqa: E731
        flat = allreduce_mean_(self.ctx, torch.stack([flatten(fill(g_val)), flatten(fill(g_js)) - flatten(fill(g_ce))]))
        return float(flat[0].double() @ flat[1].double())

    def on_epoch_start(self, model, epoch):
        c = self.config
        if c.lr_alpha == 0:
            return
        if epoch > 0 and epoch % c.lr_decay_epochs == 0:
            self.lr_alpha /= 2
        h = self.hypergradient(model)
        self.alpha1 = min(c.alpha_max, max(c.alpha_min, self.alpha1 + self.lr_alpha * h))

    def loss(self, model, batch, outputs):
        ce = F.cross_entropy(outputs.logits, batch["labels"])
        js = alignment(outputs.unimodal_logits, self.config.alignment)
        a1 = self.alpha1
        return 2 * ((1 - a1) * ce + a1 * js), {"lfm_alpha1": a1, "lfm_js": js.item()}

    def state_dict(self):
        return {"alpha1": self.alpha1, "lr_alpha": self.lr_alpha}

    def load_state_dict(self, state):
        self.alpha1 = float(state.get("alpha1", self.alpha1))
        self.lr_alpha = float(state.get("lr_alpha", self.lr_alpha))
