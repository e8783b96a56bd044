"""`greedy`: balanced multimodal learning against the greedy nature of multimodal DNNs.

Wu, Jastrzebski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal
Deep Neural Networks", ICML 2022. Stage: feed-forward (own architecture and forward mode).
Follows: nyukat/greedy_multimodal_learning@a190e03755bd8d0883b2c5c0cd7921d2561ce2ee:src/callbacks.py
(`Bias_Mitigation_Strong`), src/balanced_mmtm.py, configs/training.gin (the paper's Colored-and-gray-MNIST /
ModelNet40 "guided" setting: epsilon 0.01, window 5, starting epoch 2).

Architecture: the classifier with MMTM blocks after every encoder layer (models/mmtm.py, built from the
recipe's `model` section). Each modality m has a main path (its encoder) and a bypass path (its
excitation layers plus the joint squeeze layers, through which the other modalities reach it). After
every measured step the learning speeds accumulate from the start of training (never reset):
M_m^main += sum ||g||^2 / sum ||theta||^2 (ratio of sums over m's encoder tensors), M_m^bypass likewise
over its bypass tensors; BDR_m = log10(M_m^bypass / M_m^main) is how much more m learns through the
cross-modal path than on its own. Steps of epochs before `starting_epoch` are measured but never
re-balance (the official warm-up). Afterwards, when d = max_m BDR_m - min_m BDR_m exceeds alpha, the next
`window_size` steps are re-balancing steps (not measured) for the caring modality c = argmax_m BDR_m:
with `rebalance: gate` (official) c's MMTM gates are replaced by their running means over training, so
c's branch gets no per-sample cross-modal signal and has to carry the prediction itself
(`rebalance: squeeze`: c's excitation sees the running means of the other modalities' squeezes instead).
Loss: fused cross-entropy.

Defaults: alpha = 0.01, window_size = 5, starting_epoch = 2 (official training.gin). MMTM squeeze ratio 4.
M > 2: yes (joint squeeze over all modalities; d over the max/min BDR). For M = 2 it is the official
|BDR_0 - BDR_1| > epsilon, caring modality the one with the larger BDR.

1 vs 2 processes: the speeds read p.grad after the all-reduce and the MMTM buffers average their batch
means over processes, so at the same global batch both runs take the same steps.

Differences from the official code:
- the official updates both modalities' running gates with the first modality's gate (a copy-paste
  slip); here each modality keeps its own;
- MMTM sits after every encoder layer of MLP or Transformer encoders, for any batch size and M
  (official: 2 ResNet/MVCNN views); BalanceBenchmark uses threshold 0.001, no warm-up, per-tensor ratios
  and restarts the speeds after every window;
- the speeds read p.grad after the all-reduce (identical on every rank; unsupported under DeepSpeed,
  whose gradients are partitioned).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs


@dataclass
class GreedyConfig(BalancerConfig):
    alpha: float = hp(0.01, "Threshold epsilon on the BDR spread d that starts a re-balancing window (official 0.01).", min=0.0)
    window_size: int = hp(5, "Re-balancing steps per window.", min=1)
    starting_epoch: int = hp(2, "First epoch (0-based) that may re-balance; earlier steps only accumulate speeds.", min=0)
    rebalance: str = hp("gate", "'gate': the caring modality's MMTM gates become their running means (official); "
                                "'squeeze': its excitation sees the other modalities' running squeezes.")


def learning_speed(named_params) -> float:
    """sum ||g||^2 / sum ||theta||^2 over the tensors that have a gradient (the official ratio of sums)."""
    g2, w2 = 0.0, 0.0
    for _, p in named_params:
        if p.grad is not None:
            g2 += float(p.grad.detach().float().pow(2).sum())
            w2 += float(p.detach().float().pow(2).sum())
    return g2 / max(w2, 1e-12)


def bdr(main: dict, bypass: dict) -> dict:
    return {m: math.log10(max(bypass[m], 1e-30) / max(main[m], 1e-30)) for m in main}


@register
class Greedy(Balancer):
    name = "greedy"
    stage = "feed-forward"
    paper = "Wu et al., ICML 2022 (greedy learning, conditional utilisation rate with MMTM)"
    needs_param_grads = True
    find_unused_parameters = True  # a gate-curated excitation layer gets no gradient on that step
    config_class = GreedyConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.alpha < 0:
            raise ValueError(f"balance.alpha must be >= 0, got {self.config.alpha}")
        if self.config.rebalance not in ("gate", "squeeze"):
            raise ValueError(f"balance.rebalance must be 'gate' or 'squeeze', got {self.config.rebalance!r}")
        if self.config.window_size < 1:
            raise ValueError(f"balance.window_size must be >= 1, got {self.config.window_size}")
        self.curating = None
        self._step_curating = None
        self.window_left = 0
        self.main: dict = {}
        self.bypass: dict = {}
        self.last_bdr: dict = {}

    def build_model(self, model_cfg, modalities, input_shapes, num_classes):
        from mmbalance_llm.models.mmtm import build_mmtm

        if model_cfg.architecture not in ("classifier", "mmtm"):
            raise ValueError(f"balance.method 'greedy' builds an MMTM model from model.architecture "
                             f"'classifier' or 'mmtm', got {model_cfg.architecture!r}")
        if len(modalities) < 2:
            raise ValueError("balance.method 'greedy' needs at least 2 modalities")
        return build_mmtm(model_cfg, modalities, input_shapes, num_classes)

    def setup(self, ctx, model):
        super().setup(ctx, model)
        ctx.unwrap(model).set_curation(self.config.rebalance)
        self._reset()

    def _reset(self):
        self.main = {m: 0.0 for m in self.ctx.modalities}
        self.bypass = {m: 0.0 for m in self.ctx.modalities}

    def forward(self, model, batch):
        self._step_curating = self.curating
        return model(curate=self.curating, **model_inputs(batch, self.ctx.modalities))

    def loss(self, model, batch, outputs):
        loss, logs = super().loss(model, batch, outputs)
        logs["greedy_rebalancing"] = 0.0 if self._step_curating is None else 1.0 + self.ctx.modalities.index(self._step_curating)
        logs.update({f"greedy_bdr_{m}": v for m, v in self.last_bdr.items()})
        return loss, logs

    def after_backward(self, model, step):
        if self.window_left > 0:  # a re-balancing step: not measured
            self.window_left -= 1
            if self.window_left == 0:
                self.curating = None
            return
        net = self.ctx.unwrap(model)
        shared = list(net.shared_bypass_parameters())
        for m in self.ctx.modalities:
            self.main[m] += learning_speed(net.main_parameters(m))
            self.bypass[m] += learning_speed(list(net.bypass_parameters(m)) + shared)
        self.last_bdr = bdr(self.main, self.bypass)
        if self.ctx.epoch < self.config.starting_epoch:
            return
        spread = max(self.last_bdr.values()) - min(self.last_bdr.values())
        if spread > self.config.alpha:
            self.curating = max(self.last_bdr, key=self.last_bdr.get)
            self.window_left = self.config.window_size

    def state_dict(self):
        return {"curating": self.curating, "window_left": self.window_left, "main": self.main,
                "bypass": self.bypass}

    def load_state_dict(self, state):
        if "window_left" in state:
            self.curating = state.get("curating")
            self.window_left = int(state["window_left"])
            self.main = {m: float(v) for m, v in state.get("main", self.main).items()}
            self.bypass = {m: float(v) for m, v in state.get("bypass", self.bypass).items()}
