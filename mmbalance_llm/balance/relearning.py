"""`relearning`: Diagnosing and Re-learning.

Wei, Li, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024. Stage: optimization.
Follows: GeWu-Lab/Diagnosing_Relearning_ECCV2024@025085ea82ed784c6ab6e5fb1b08bfe498dd0fc7:code/ours.py
(`reinit_score`, `reinit`, the epoch loop) and code/script/ours.sh (CREMA-D: lambda 3, reinit_epoch 20,
reinit_num 3, 90 epochs).

Training is plain fused cross-entropy. After 0-based epoch e with e > 0 and e % `reinit_epoch` == 0 (the
official `epoch % reinit_epoch == 0 and epoch > 0`), at most `reinit_num` times, i.e. after 21, 41 and 61
trained epochs by default, each modality is diagnosed and partly re-initialised:
1. h_m is extracted on the training set (`train_eval` loader) and on the **validation** split (never test;
   the reference toolkit uses test as validation on most datasets), gathered from every process.
2. Features are min-max scaled to [-1, 1] per dimension and clustered by KMeans with K = number of classes
   (k-means++, `kmeans_seed`, same on every rank, so every rank computes the same clusters).
3. Purity on each set; the gap Delta_m = |purity_train - purity_val| measures how much encoder m
   over-fits (memorises) instead of learning a transferable representation.
4. Strength alpha_m = tanh(lambda * Delta_m); every parameter of encoder m is reset
   theta <- alpha_m * theta_init + (1 - alpha_m) * theta, theta_init being the weights at the start of
   training (kept in the balancer state, so a resumed run resets toward the same point).

Defaults: lambda = 3, reinit_epoch = 20, reinit_num = 3 (official script). M > 2: supported, the diagnosis
is per modality. lambda = 0 leaves the weights untouched (bit-identical to the baseline). The reset writes
parameter values in place, which DeepSpeed's sharded master weights would not see, so DeepSpeed is refused.

Differences from the official code: KMeans is this package's k-means++ with `kmeans_init` restarts (the
official sklearn `KMeans(random_state=0)`, whose restart count depends on the sklearn version), so cluster
assignments can differ on the same features; the diagnosis reads the validation split (BalanceBenchmark
uses test as validation on most datasets); the optimizer state is kept across a reset, as the official.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmbalance_llm.balance import register
from mmbalance_llm.balance._kmeans import kmeans, minmax_scale, purity
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp, model_inputs


@dataclass
class ReLearningConfig(BalancerConfig):
    lam: float = hp(3.0, "lambda in the reset strength alpha_m = tanh(lambda * |purity_train - purity_val|). 0 disables resets.", min=0.0)
    reinit_epoch: int = hp(20, "Diagnose and reset after 0-based epochs e > 0 with e % reinit_epoch == 0 (official).", min=1)
    reinit_num: int = hp(3, "Maximum number of resets in a run.", min=0)
    kmeans_seed: int = hp(0, "Seed of the k-means++ initialisation (the same on every process).")
    kmeans_init: int = hp(3, "Number of k-means++ restarts; the lowest-inertia clustering is kept.", min=1)


def reset_toward_init(params, init: dict, strength: float) -> None:
    """theta <- strength * theta_init + (1 - strength) * theta, in place."""
    with torch.no_grad():
        for name, p in params:
            p.lerp_(init[name].to(p.device, p.dtype), strength)


@register
class ReLearning(Balancer):
    name = "relearning"
    stage = "optimization"
    paper = "Wei et al., Diagnosing and Re-learning for Balanced Multimodal Learning, ECCV 2024"
    config_class = ReLearningConfig

    def check_engine(self, accelerator, task: str = "classify") -> None:
        if accelerator.distributed_type.name == "DEEPSPEED":  # refused before the engine is built
            raise ValueError("balance.method 'relearning' resets parameters in place, which DeepSpeed's sharded "
                             "master weights do not see; use DDP")

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if c.reinit_epoch < 1:
            raise ValueError(f"balance.reinit_epoch must be >= 1, got {c.reinit_epoch}")
        if c.reinit_num < 0:
            raise ValueError(f"balance.reinit_num must be >= 0, got {c.reinit_num}")
        self.theta_init: dict = {}
        self.resets_done = 0
        self.history: list = []

    def setup(self, ctx, model):
        super().setup(ctx, model)
        net = ctx.unwrap(model)
        self.theta_init = {n: p.detach().clone().cpu() for m in ctx.modalities for n, p in net.modality_parameters(m)}

    @torch.no_grad()
    def extract(self, model, loader) -> tuple:
        """Features of every modality and labels over a loader, gathered from all processes."""
        acc, net = self.ctx.accelerator, self.ctx.unwrap(model)
        was_training = net.training
        net.eval()
        feats, labels = {m: [] for m in self.ctx.modalities}, []
        for batch in loader:
            out = net.encode(**model_inputs(batch, self.ctx.modalities))
            gathered = acc.gather_for_metrics({**{m: out[m].float() for m in out}, "labels": batch["labels"]})
            for m in self.ctx.modalities:
                feats[m].append(gathered[m].cpu())
            labels.append(gathered["labels"].cpu())
        net.train(was_training)
        return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)

    def diagnose(self, model) -> dict:
        """alpha_m = tanh(lambda * |purity_train - purity_val|) per modality."""
        c, k = self.config, self.ctx.num_classes
        train_f, train_y = self.extract(model, self.ctx.loaders["train_eval"])
        val_f, val_y = self.extract(model, self.ctx.loaders["validation"])
        result = {}
        for m in self.ctx.modalities:
            p_train = purity(kmeans(minmax_scale(train_f[m].double()), k, c.kmeans_seed, c.kmeans_init)[0], train_y)
            p_val = purity(kmeans(minmax_scale(val_f[m].double()), k, c.kmeans_seed, c.kmeans_init)[0], val_y)
            result[m] = {"purity_train": p_train, "purity_val": p_val,
                         "alpha": math.tanh(c.lam * abs(p_train - p_val))}
        return result

    def on_epoch_end(self, model, epoch):
        c = self.config
        if epoch == 0 or epoch % c.reinit_epoch != 0 or self.resets_done >= c.reinit_num:
            return
        diagnosis = self.diagnose(model)
        net = self.ctx.unwrap(model)
        for m, d in diagnosis.items():
            if d["alpha"] > 0:
                reset_toward_init(list(net.modality_parameters(m)), self.theta_init, d["alpha"])
        self.resets_done += 1
        self.history.append({"epoch": epoch + 1, **{m: d for m, d in diagnosis.items()}})
        self.ctx.accelerator.print(f"[relearning] epoch {epoch + 1}: " + ", ".join(
            f"{m} purity {d['purity_train']:.3f}/{d['purity_val']:.3f} -> reset {d['alpha']:.3f}"
            for m, d in diagnosis.items()))

    def state_dict(self):
        state = {"resets_done": self.resets_done, "history": self.history}
        state.update({f"theta_init.{n}": t.clone().contiguous() for n, t in self.theta_init.items()})
        return state

    def load_state_dict(self, state):
        self.resets_done = int(state.get("resets_done", 0))
        self.history = list(state.get("history", []))
        loaded = {k[len("theta_init."):]: v for k, v in state.items() if k.startswith("theta_init.")}
        if loaded:
            self.theta_init = loaded
