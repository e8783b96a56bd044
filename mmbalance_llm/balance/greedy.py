"""`greedy`: balanced multimodal learning against the greedy nature of multimodal DNNs.

Wu, Jastrzebski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal
Deep Neural Networks", ICML 2022. Stage: feed-forward (own architecture and forward mode).

Architecture: the classifier with MMTM blocks after every encoder layer (models/mmtm.py, built from the
recipe's `model` section). Each modality m has a main path (its encoder) and a bypass path (its
excitation layers, through which the other modalities reach it). After every normal step the learning
speeds M_m^main += sum ||g||^2 / ||theta||^2 over m's encoder tensors and M_m^bypass likewise over its
excitation tensors are accumulated; BDR_m = log10(M_m^bypass / M_m^main) is how much more m learns through
the cross-modal path than on its own (the conditional utilisation imbalance). When
d = max_m BDR_m - min_m BDR_m exceeds alpha, the next `window_size` steps are re-balancing steps for the
caring modality c = argmax_m BDR_m: its excitation sees the running means of the other modalities'
squeezes instead of their per-sample values, so its own branch has to carry the prediction. The speeds
restart after each window. Loss: fused cross-entropy.

Defaults: alpha = 0.001, window_size = 5 (BB). MMTM squeeze ratio 4, running-mean momentum 0.1.
M > 2: yes (joint squeeze over all modalities; d over the max/min BDR). For M = 2 it is BB's d = BDR_1 - BDR_2.

Differences from the reference code, on purpose: BB's MMTM hard-codes batch 64 (breaks at other batch
sizes) and is 2-modal; here any batch size and M work, and MMTM sits after every encoder layer of
MLP or Transformer encoders (BB: after ResNet layers 1-4). The speeds read p.grad after the all-reduce
(identical on every rank; unsupported under DeepSpeed, whose gradients are partitioned).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs


@dataclass
class GreedyConfig(BalancerConfig):
    alpha: float = hp(0.001, "Threshold on the BDR spread d that starts a re-balancing window.")
    window_size: int = hp(5, "Re-balancing steps per window.")


def learning_speed(named_params) -> float:
    total = 0.0
    for _, p in named_params:
        if p.grad is not None:
            total += float(p.grad.detach().float().pow(2).sum() / p.detach().float().pow(2).sum().clamp_min(1e-12))
    return total


def bdr(main: dict, bypass: dict) -> dict:
    return {m: math.log10(max(bypass[m], 1e-30) / max(main[m], 1e-30)) for m in main}


@register
class Greedy(Balancer):
    name = "greedy"
    stage = "feed-forward"
    paper = "Wu et al., ICML 2022 (greedy learning, conditional utilisation rate with MMTM)"
    needs_param_grads = True
    config_class = GreedyConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.alpha < 0:
            raise ValueError(f"balance.alpha must be >= 0, got {self.config.alpha}")
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
                self._reset()
            return
        net = self.ctx.unwrap(model)
        for m in self.ctx.modalities:
            self.main[m] += learning_speed(net.main_parameters(m))
            self.bypass[m] += learning_speed(net.bypass_parameters(m))
        self.last_bdr = bdr(self.main, self.bypass)
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
