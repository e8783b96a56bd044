"""`rollingq`: RollingQ, query rotation for attention fusion (Ni et al., "RollingQ: Reviving the
Cooperation Dynamics in Multimodal Transformer", ICML 2025, arXiv 2506.11465).

Follows: GeWu-Lab/RollingQ_ICML2025@23f116282b1603da690ae4d5dc43d188c1bcc18d:method.py, train_func.py.
Stage: feed-forward (it changes the fusion query; the loss is the plain cross-entropy). In attention
fusion the query keeps preferring the keys of one modality, which then gets the larger gradients, a
self-reinforcing loop; rotating the query toward a balanced key target breaks it.

At the end of an epoch, while fewer than `r_time` rotations were done: one pass (eval mode, no
gradient) over the ordered training data measures, per fusion layer and head, the alignments
a_m = mean_b cos(q_b, mean_i k^m_{b,i}), AIR = max_m a_m - min_m a_m, the key means mu_m and the mean
query q (which already includes the current rotation); all sums are reduced across processes. Each
(layer, head) with AIR > `beta` gets R <- R_new R, where R_new maps q^ onto the target
t = sum_m w_m mu_m^ (w = softmax(-2 sigma a), the paper's alpha = (1 + tanh(-sigma AIR)) / 2 for M = 2),
by the paper's SVD rotation (`rotation: svd`) or the minimal plane rotation (`rotation: plane`).
The rotation lives in the model (`query_rotation` buffer + `config.rotation_count`) and is saved with it.

Defaults are the official code's: r_time 1, beta 0.0, sigma 0.0 (its arguments; the paper's tuned
values are not published). M > 2: supported (the target weights generalise as above).

Differences from the official code: AIR for the trigger is measured over the whole training
set in the estimation pass, not on the last training batch (less noisy, and the same on every rank);
multi-layer / multi-head fusion gets one rotation per (layer, head) (the paper has one single-head
layer). Needs an attention-fusion model: with the default `model.architecture: classifier` this method
builds `fusion_transformer` from the same model settings; other architectures must expose
`query_rotation` and the diagnostics hook.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs, zero_stage
from mmbalance_llm.eval.evaluator import recording
from mmbalance_llm.models.rolling_query import rotate_from_sums


@dataclass
class RollingQConfig(BalancerConfig):
    r_time: int = hp(1, "Maximum number of rotation rounds (the official code's --r_time).", min=0)
    beta: float = hp(0.0, "Rotate a (layer, head) only when its AIR exceeds this (--beta).", min=0.0)
    sigma: float = hp(0.0, "Target weighting strength: alpha = (1 + tanh(-sigma AIR)) / 2 (--sigma).")
    rotation: str = hp("svd", "'svd' (the paper's U V^T) or 'plane' (minimal rotation in span(q, t)).")
    layers: list = hp([], "Task sft: decoder layers whose answer queries rotate (indices, negative from the end; "
                          "empty: every decoder layer).")
    estimate_max_batches: int = hp(0, "Task sft: cap on the training batches of each estimation pass (0: the "
                                      "whole training split).", min=0)

    def __post_init__(self):
        if not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"balance.layers must be a list of decoder layer indices, got {self.layers!r}")
        if self.rotation not in ("svd", "plane"):
            raise ValueError(f"balance.rotation must be 'svd' or 'plane', got {self.rotation!r}")
        if self.r_time < 0:
            raise ValueError(f"balance.r_time must be >= 0, got {self.r_time}")


@register
class RollingQ(Balancer):
    name = "rollingq"
    stage = "feed-forward"
    paper = "RollingQ: Reviving the Cooperation Dynamics in Multimodal Transformer (Ni et al., ICML 2025)"
    supports_many_modalities = True
    tasks = ("classify", "sft")
    # Measured: ZeRO-2 equals DDP bit for bit. ZeRO-3 replaces torch's linear by its own, whose bias gradient
    # rounds differently; the key bias's gradient is 0 in exact arithmetic (a softmax shift), so AdamW turns
    # that rounding into lr-sized steps (3e-4 after one step), and the SVD rotation, free in the complement
    # of span(q, t), amplifies it (1.4 after 8 steps). With zero_optimization.memory_efficient_linear: false
    # (torch's linear) ZeRO-3 equals DDP bit for bit.
    zero_stages = (0, 1, 2)
    zero_stages_reason = ("DeepSpeed's memory-efficient ZeRO-3 linear rounds the key bias gradient differently and "
                          "the query rotation amplifies it; ZeRO-3 with torch's linear, "
                          "accelerate_configs/deepspeed_zero3_torch_linear.yaml, also runs")
    config_class = RollingQConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.rotations = 0
        self._decoder = None  # task sft: the DecoderRollingQ handle (balance/_rollingq_sft.py)

    def check_engine(self, accelerator, task: str = "classify") -> None:
        if task == "sft" and accelerator.distributed_type.name == "DEEPSPEED":
            # measured (tiny LLaVA + MokA, 2 processes): ZeRO-2 ends 6e-3 from DDP after one rotation; the
            # rotation is free in the complement of span(q, t), so the SVD turns DeepSpeed's rounding into a
            # different rotation, as in the classifier version under ZeRO-3
            raise ValueError("balance.method 'rollingq' on an MLLM decoder does not run under DeepSpeed (its "
                             "rotation amplifies DeepSpeed's rounding: 6e-3 from DDP after one rotation); it runs "
                             "under DDP (accelerate_configs/ddp_cpu_2proc.yaml or multi_gpu.yaml)")
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        config = getattr(plugin, "deepspeed_config", None) or {}
        if (zero_stage(accelerator) == 3
                and config.get("zero_optimization", {}).get("memory_efficient_linear", True) is False):
            return  # torch's linear: measured equal to DDP
        super().check_engine(accelerator, task)

    def build_model(self, model_cfg, modalities, input_shapes, num_classes):
        from mmbalance_llm.models.registry import build_model

        if model_cfg.architecture == "classifier":  # RollingQ needs attention fusion
            import dataclasses

            model_cfg = dataclasses.replace(model_cfg, architecture="fusion_transformer")
        return build_model(model_cfg, modalities, input_shapes, num_classes)

    def setup(self, ctx, model) -> None:
        super().setup(ctx, model)
        self._model = model
        if ctx.task == "sft":
            from mmbalance_llm.balance._rollingq_sft import DecoderRollingQ

            self._decoder = DecoderRollingQ(ctx, model, self.config)
            return
        for key, plain in (("layers", []), ("estimate_max_batches", 0)):
            if getattr(self.config, key) != plain:
                raise ValueError(f"balance.{key} applies to task sft (an MLLM decoder); the classifier version "
                                 f"rotates its fusion layers' queries over the whole training split")
        core = ctx.unwrap(model)
        if not (hasattr(core, "query_rotation") and hasattr(core, "diagnostic_sums")):
            raise ValueError("balance.method 'rollingq' needs an attention-fusion model with a query rotation "
                             "(model.architecture: fusion_transformer)")

    @torch.no_grad()
    def estimate(self, model) -> dict:
        """One pass over the ordered training data; the reduced statistic sums."""
        ctx = self.ctx
        was_training = model.training
        model.eval()
        rec = recording(model, ctx.accelerator)
        for batch in ctx.loaders["train_eval"]:
            with rec:
                model(**model_inputs(batch, ctx.modalities))
        model.train(was_training)
        return rec.sums()

    def on_epoch_end(self, model, epoch: int) -> None:
        if self.rotations >= self.config.r_time:
            return
        info = self._decoder.rotate(model) if self._decoder is not None else self._rotate_fusion_query(model)
        rotated = bool(info["rotated"].any())
        self.rotations += int(rotated)
        self.ctx.log({"step": self.ctx.global_step, "epoch": epoch + 1, "split": "rollingq",
                      "air": float(info["air"].mean()), "rotated_heads": int(info["rotated"].sum()),
                      "rotation_angle_deg": float(info["angle"][info["rotated"]].mean()) if rotated else 0.0,
                      "rotations": self.rotations})

    def _rotate_fusion_query(self, model) -> dict:
        core = self.ctx.unwrap(model)
        info = rotate_from_sums(self.estimate(model), core.query_rotation, self.config.beta, self.config.sigma,
                                self.config.rotation)
        if bool(info["rotated"].any()):
            core.config.rotation_count = int(core.config.rotation_count) + 1
        return info

    def state_dict(self) -> dict:
        if self._decoder is not None:  # the decoder's rotation is not in the model's weights: keep it here
            return {"rotations": self.rotations, **self._decoder.state()}
        return {"rotations": self.rotations}

    def load_state_dict(self, state: dict) -> None:
        self.rotations = int(state.get("rotations", 0))
        if self._decoder is not None:
            self._decoder.load(state)
            return
        if getattr(self, "_model", None) is not None:  # the rotation buffer comes back with the weights
            core = self.ctx.unwrap(self._model)
            core.config.rotation_count = max(int(core.config.rotation_count), self.rotations)

    def save_pretrained(self, model, path: str) -> None:
        if self._decoder is not None:
            self._decoder.save_pretrained(path)

    def load_pretrained(self, model, path: str) -> None:
        if self._decoder is not None:
            self._decoder.load_pretrained(path)
