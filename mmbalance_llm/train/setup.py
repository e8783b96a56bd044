"""Building blocks of a run: the Accelerator (with the multi-process guard), optimizer and schedule."""
from __future__ import annotations

import math
import os

import torch

LAUNCH_HELP = (
    "the launcher started {n} processes but Accelerate joined them in no process group, so each would train alone on all the data. "
    "On CPU, launch DDP with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {n} ... "
    "(or torchrun); see the README's launch table"
)


def launched_world_size() -> int:
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def make_accelerator(train_cfg, find_unused_parameters: bool = False, log_with=None, logging_dir=None):
    """`log_with` / `logging_dir`: Accelerate's experiment trackers (train/logger.py `log_with`)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if not torch.cuda.is_available() and launched_world_size() > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU needs it explicitly
    accelerator = Accelerator(
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        mixed_precision=train_cfg.mixed_precision,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=logging_dir, logging_dir=logging_dir) if log_with else None,
    )
    check_launch(accelerator)
    match_deepspeed_clipping(accelerator, train_cfg.max_grad_norm)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type.name != "FSDP":
        # measured on CPU: with ACCELERATE_USE_CPU=true an FSDP launch runs as plain multi-process CPU DDP
        accelerator.print(f"[mmbalance] note: FSDP was requested but Accelerate runs "
                          f"{accelerator.distributed_type.name} (FSDP needs GPUs)")
    return accelerator


def match_deepspeed_clipping(accelerator, max_grad_norm) -> None:
    """Make DeepSpeed clip exactly as the loop does under DDP: at `train.max_grad_norm`, or not at all.

    DeepSpeed clips inside its own step (Accelerate's `clip_grad_norm_` is a no-op there), and Accelerate
    fills an unset ("auto") `gradient_clipping` with 1.0. Without this, a recipe without `max_grad_norm`
    is clipped at 1.0 under DeepSpeed only (measured: methods with several cross-entropies, whose gradient
    norm exceeds 1, drifted a few test points from DDP). A launcher config that sets a different value is
    refused, since the two engines would train differently."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type.name != "DEEPSPEED" or plugin is None:
        return
    want = float(max_grad_norm or 0.0)  # DeepSpeed: 0 means no clipping
    have = plugin.deepspeed_config.get("gradient_clipping", "auto")
    if have not in (None, "auto") and float(have) != want:
        from mmbalance_llm.config import RecipeError

        raise RecipeError(f"the DeepSpeed config sets gradient_clipping {have} but recipe key 'train.max_grad_norm' is "
                          f"{max_grad_norm}; set train.max_grad_norm (the loop clips the same under every engine) and "
                          f"leave gradient_clipping out of the DeepSpeed config")
    plugin.deepspeed_config["gradient_clipping"] = want
    plugin.gradient_clipping = want


def process_state():
    """Accelerate's PartialState with the same CPU / gloo choices as `make_accelerator`, for work that
    runs before (or around) a Trainer, e.g. preparing data once in `mmbalance compare`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    kwargs = {"backend": "gloo"} if not torch.cuda.is_available() and launched_world_size() > 1 else {}
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)


def check_launch(state) -> None:
    """Refuse to run when the launcher started several processes that are not joined in a process group.

    Seen on CPU: `--multi_gpu` without ACCELERATE_USE_CPU=true reports num_processes=2 but type NO, with
    no process group, so every process would silently train alone on all the data."""
    n = launched_world_size()
    if n > 1 and (state.num_processes == 1 or state.distributed_type.name == "NO"
                  or not torch.distributed.is_initialized()):
        raise RuntimeError(LAUNCH_HELP.format(n=n))


def make_optimizer(model, cfg):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    from mmbalance_llm.models.param_groups import modality_lr_groups

    groups = modality_lr_groups(model, groups)  # model.encoders.<m>.lr: per-modality learning rates
    groups = learner_groups(model, groups)  # MLLMs: "feature" / "llm" groups, for Trainer.set_lr_factors
    # no empty groups: DeepSpeed drops them, and a schedule built on the torch optimizer would then count
    # more groups than the engine's optimizer has (an adapter has no 1-d parameters)
    groups = [g for g in groups if g["params"]]
    if not groups:
        from mmbalance_llm.config import RecipeError

        raise RecipeError("the model has no trainable parameter (every part frozen and no adapter?): unfreeze a "
                          "part in model.freeze or choose an adapter")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def learner_of(model):
    """For an HF MLLM (a model with a modality map): parameter name -> "feature" (towers and projector) or "llm"
    (the language model and its adapter), else None; None for other models."""
    from mmbalance_llm.models.modality_map import get_modality_map

    try:
        mmap = get_modality_map(model)
    except (TypeError, ValueError):
        return None
    learners = {"tower": "feature", "projector": "feature", "language_model": "llm"}
    return lambda name: learners.get(mmap.component_of(name))


def learner_groups(model, groups: list) -> list:
    """Split each group by learner and tag it (`group["learner"]`); groups of other models are unchanged. AdamW
    and SGD update every parameter alone, so the split changes no number."""
    which = learner_of(model)
    if which is None:
        return groups
    learner = {id(p): which(n) for n, p in model.named_parameters()}
    out = []
    for group in groups:
        for name in ("llm", "feature", None):  # the LLM first: the logged "lr" is its group's
            mine = [p for p in group["params"] if learner.get(id(p)) == name]
            if mine:
                out.append({**group, "params": mine, **({"learner": name} if name else {})})
    return out


def make_scheduler(optimizer, cfg, steps_per_epoch: int, total_steps: int, num_processes: int = 1):
    """The learning-rate schedule over `total_steps` optimizer steps (per process), or None for a constant
    rate without warm-up (a scheduler that multiplies by 1 costs a call per step and buys nothing).

    Accelerate steps a prepared scheduler once per process and optimizer step, so the schedule is laid out
    in `num_processes` x optimizer steps. The warm-up and the cosine / linear shapes are transformers'."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    if cfg.lr_scheduler_type == "constant" and not warmup:
        return None
    n = num_processes
    total, warmup = max(1, total_steps * n), warmup * n

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return step / warmup
        if cfg.lr_scheduler_type == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        if cfg.lr_scheduler_type == "step":
            return cfg.gamma ** (step // max(1, cfg.step_size_epochs * steps_per_epoch * n))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
