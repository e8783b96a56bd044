"""`umt`: Uni-Modal Teacher.

Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML 2023 (UMT; the
companion method UME is `ume`). Stage: objective.
Follows: GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3:balancemm/trainer/UMT_trainer.py (the loss; sigma 10) and the paper (two-stage
training); the paper's own code was not compared.

First a unimodal model is trained for every modality; then the multimodal model is trained with

    L = CE(z) + sigma * sum_m MSE(h_m, h_m^teacher)

where h_m^teacher is the frozen teacher encoder's feature of the same input. This distils good unimodal
features into each encoder while the fused head learns the cross-modal interaction.

Teachers are ordinary saved models (`save_pretrained` folders, e.g. a run's `best/`):
- `balance.teacher_paths: {audio: PATH, visual: PATH}` loads them;
- modalities without a path get a teacher trained here, through the normal `Trainer` with the same recipe
  restricted to `data.modalities: [m]` and `balance.method: none`, into `output_dir/teachers/<m>` (its
  best checkpoint, chosen on validation, is loaded with `from_pretrained`). A resumed run reuses teachers
  that are already there. Teacher training costs one extra (unimodal) training run per modality.
A teacher's encoder must output features of the student's size (`model.feature_dim`).

Defaults: sigma = 10 (reference toolkit). sigma = 0 skips the teachers and is exactly the baseline.

M > 2: supported (one teacher per modality).

Differences from the reference toolkit: teachers are found from explicit paths or trained by this run
(BB searches its out_dir for checkpoints and hard-codes device_ids=[0, 1]); teachers are loaded as
safetensors models.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer, BalancerConfig, hp


@dataclass
class UMTConfig(BalancerConfig):
    sigma: float = hp(10.0, "Weight sigma of the feature-distillation MSE. 0 disables the teachers.", min=0.0)
    teacher_paths: dict = hp({}, "{modality: saved model folder}; modalities without one get a teacher trained "
                                 "with this recipe restricted to that modality, in output_dir/teachers/<m>.")


def teacher_recipe(recipe, modality: str):
    """The run's recipe restricted to one modality, plain CE, written under output_dir/teachers/<m>."""
    from mmbalance_llm.config import recipe_from_dict

    raw = copy.deepcopy(recipe.to_dict())
    raw["data"]["modalities"] = [modality]
    raw["balance"] = {"method": "none"}
    raw["output_dir"] = os.path.join(recipe.output_dir, "teachers", modality)
    raw["train"]["resume_from_checkpoint"] = None
    raw["train"]["stop_after_steps"] = None
    raw["model"]["encoders"] = {k: v for k, v in raw["model"].get("encoders", {}).items() if k == modality}
    return recipe_from_dict(raw)


def train_teacher(recipe, modality: str, reuse: bool) -> str:
    from mmbalance_llm.train.trainer import Trainer

    sub = teacher_recipe(recipe, modality)
    best = os.path.join(sub.output_dir, "best")
    if not (reuse and os.path.isfile(os.path.join(sub.output_dir, "final_metrics.json"))):
        Trainer(sub).fit()
    return best


def load_teacher(path: str, modality: str, device):
    from transformers import AutoModel

    import mmbalance_llm.models.classifier  # noqa: F401  (registers the classifier with AutoModel)

    if not os.path.isdir(path):
        raise ValueError(f"balance.teacher_paths.{modality}: '{path}' is not a saved model folder")
    teacher = AutoModel.from_pretrained(path)
    mods = list(getattr(teacher.config, "modalities", []))
    if modality not in mods:
        raise ValueError(f"balance.teacher_paths.{modality}: the model at '{path}' has modalities {mods}")
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


@register
class UMT(Balancer):
    name = "umt"
    stage = "objective"
    paper = "Du et al., On Uni-Modal Feature Learning in Supervised Multi-Modal Learning, ICML 2023 (UMT)"
    config_class = UMTConfig
    zero_stages = (0, 1, 2)
    zero_stages_reason = "its teachers' features use parameters that ZeRO-3 partitions"

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.sigma < 0:
            raise ValueError(f"balance.sigma must be >= 0, got {self.config.sigma}")
        if not isinstance(self.config.teacher_paths, dict):
            raise ValueError("balance.teacher_paths must be a mapping {modality: path}")
        self.teachers = {}

    def setup(self, ctx, model):
        super().setup(ctx, model)
        unknown = set(self.config.teacher_paths) - set(ctx.modalities)
        if unknown:
            raise ValueError(f"balance.teacher_paths names modalities not in the data: {sorted(unknown)}")
        if self.config.sigma == 0:
            return
        reuse = ctx.resuming
        for m in ctx.modalities:
            path = self.config.teacher_paths.get(m) or train_teacher(ctx.recipe, m, reuse)
            self.teachers[m] = load_teacher(path, m, ctx.accelerator.device)

    def _teacher_features(self, m, batch):
        teacher = self.teachers[m]
        inputs = {k: (batch[k] if k == m else torch.zeros_like(batch[k])) for k in teacher.config.modalities}
        with torch.no_grad():
            return teacher(**inputs).features[m]

    def loss(self, model, batch, outputs):
        loss, logs = super().loss(model, batch, outputs)
        if self.config.sigma == 0:
            return loss, logs
        distill = 0.0
        for m, h in outputs.features.items():
            target = self._teacher_features(m, batch)
            if target.shape != h.shape:
                raise ValueError(f"umt teacher for '{m}' gives features of shape {tuple(target.shape[1:])}, "
                                 f"the model {tuple(h.shape[1:])}; use the same model.feature_dim")
            mse = F.mse_loss(h, target.to(h.dtype))
            logs[f"umt_mse_{m}"] = mse.item()
            distill = distill + mse
        return loss + self.config.sigma * distill, logs
