"""The hook interface every balancing method implements.

The trainer calls, per optimizer step::

    outputs = balancer.forward(model, batch)            # feed-forward methods change this
    loss, logs = balancer.loss(model, batch, outputs)   # objective methods change this
    accelerator.backward(loss)
    balancer.after_backward(model, step)                # optimization methods edit gradients here
    optimizer.step()

and `on_epoch_start` / `on_epoch_end` around each epoch (prototypes, re-initialisation, valuation).
Methods that reorganise a whole epoch override `train_epoch`; data-stage methods return their own
loader from `train_loader`. Methods never reach into a model class: they read the model-output
contract (`logits`, `features`, `unimodal_logits`) and `modality_parameters(m)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

STAGES = ("none", "data", "feed-forward", "objective", "optimization")


@dataclass
class BalancerConfig:
    """Base config: methods subclass it with their hyperparameters (each field carries help text and
    the paper default in its metadata)."""


@dataclass
class TrainContext:
    """Everything a balancer may use besides the model and the batch; it never sees the trainer.

    `loaders` holds `train` (shuffled), `train_eval` (ordered, no augmentation) and `validation`; test is
    never exposed to methods. The callables are the loop's public services: `log(row)` writes a
    `metrics.jsonl` / TensorBoard row, `training_step(batch)` is the loop's one optimizer step (for methods
    that reorganise an epoch), `optimizer_step(batch)` the same step without advancing the schedule, the
    step counter or the logs (for the extra per-modality steps of MLA), `stop_requested()` says whether the
    run must stop now (train.stop_after_steps / max_steps), `set_lr_factors(factors)` multiplies the scheduled
    learning rate of an MLLM's feature-side / LLM parameter groups (CoMMIT's coordinated learning rates)."""

    accelerator: Any
    modalities: list
    num_classes: Optional[int]
    recipe: Any
    loaders: dict
    seed: int = 0
    epoch: int = 0
    global_step: int = 0
    task: str = "classify"
    train_dataset: Any = None          # the training split (a datasets.Dataset); methods re-sample it
    steps_per_epoch: int = 1           # optimizer steps per epoch (per process)
    total_steps: int = 1               # optimizer steps of the whole run
    eval_batch_size: int = 256
    num_workers: int = 0
    resuming: bool = False             # the run continues from a checkpoint
    log: Callable = lambda row: None
    training_step: Optional[Callable] = None
    optimizer_step: Optional[Callable] = None
    stop_requested: Callable = lambda: False
    task_forward: Optional[Callable] = None   # the task's plain forward(model, batch) -> outputs
    task_loss: Optional[Callable] = None      # the task's plain loss(batch, outputs) -> (loss, logs)
    progress: dict = dataclasses.field(default_factory=dict)  # the loop's counters (read-only for methods)
    set_lr_factors: Optional[Callable] = None  # ({learner: factor}) scales the scheduled lr of the "feature" /
    # "llm" parameter groups of an MLLM from the next optimizer step on (train/trainer.py Trainer.set_lr_factors)

    @property
    def batches_done(self) -> int:
        """Batches of the current epoch already trained (after a resume: the skipped ones too)."""
        return int(self.progress.get("batches_done", 0))

    def unwrap(self, model):
        # Cached: accelerate's unwrap_model re-reads package metadata on every call (~7 ms on CPU),
        # which balancers that unwrap once per step would pay on every step.
        cached = self.__dict__.get("_unwrapped")
        if cached is not None and cached[0] is model:
            return cached[1]
        net = self.accelerator.unwrap_model(model)
        self.__dict__["_unwrapped"] = (model, net)
        return net

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a statistic over processes, so every rank applies the same update."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.detach().clone(), reduction="sum")

    def rank_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, step, salt), identical on every rank: for random choices that all
        replicas must agree on."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.global_step) * 1_009 + salt)


def zero_stage(accelerator):
    """The DeepSpeed ZeRO stage the Accelerator runs (0-3), or None when it does not run DeepSpeed."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        return None
    return int(getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) or 0)


def model_inputs(batch: dict, modalities) -> dict:
    return {m: batch[m] for m in modalities}


def classify_forward(ctx: TrainContext, model, batch: dict):
    """The classifier task's forward: one keyword argument per modality."""
    inputs = model_inputs(batch, ctx.modalities)
    # Labels only reach models that turn them into their own `aux_loss` (detached probe heads); other
    # models would spend a second fused cross-entropy per step that the balancer's loss recomputes.
    if getattr(ctx.unwrap(model), "aux_loss_from_labels", False):
        inputs["labels"] = batch["labels"]
    return model(**inputs)


def classify_loss(batch: dict, outputs):
    """The classifier task's loss: fused cross-entropy."""
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"]), {}


class Balancer:
    """No balancing: fused cross-entropy. Subclasses set the class attributes below."""

    name: str = "none"
    stage: str = "none"
    paper: str = ""
    supports_many_modalities: bool = True  # M > 2
    requires_unimodal_logits: bool = False  # needs a fusion head that splits (concat / sum)
    needs_param_grads: bool = False  # edits p.grad after the all-reduce (unsupported under DeepSpeed)
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient on some steps
    tasks: tuple = ("classify",)  # the tasks (recipe `task`) the method is defined for
    zero_stages: tuple = (0, 1, 2, 3)  # DeepSpeed ZeRO stages the method runs under (measured: README table)
    zero_stages_reason: str = ""  # why the others are refused, shown in the refusal
    config_class = BalancerConfig

    def __init__(self, config: Optional[BalancerConfig] = None):
        self.config = config if config is not None else self.config_class()
        self.ctx: Optional[TrainContext] = None

    # -- set-up -------------------------------------------------------------------------------
    def build_model(self, model_cfg, modalities, input_shapes, num_classes):
        """Build the model from the recipe's `model` section. Methods that need another architecture
        (a shared head, cross-modal blocks) override this and still return a PreTrainedModel."""
        from mmbalance_llm.models.registry import build_model

        return build_model(model_cfg, modalities, input_shapes, num_classes)

    def setup(self, ctx: TrainContext, model) -> None:
        """Called once after the model is built and prepared; check requirements here."""
        self.ctx = ctx
        m = ctx.unwrap(model)
        if self.requires_unimodal_logits and not getattr(m, "has_unimodal_logits", False):
            raise ValueError(
                f"balance.method '{self.name}' needs split unimodal logits; use model.fusion concat or sum"
            )
        if len(ctx.modalities) > 2 and not self.supports_many_modalities:
            raise ValueError(f"balance.method '{self.name}' supports 2 modalities, the data has {len(ctx.modalities)}")

    def check_engine(self, accelerator, task: str = "classify") -> None:
        """Refuse an engine the method cannot run under, in one line. The loop calls this right after the
        Accelerator is made, before the (minute-long, on CPU) DeepSpeed engine is built; `task` is the recipe's."""
        stage = zero_stage(accelerator)
        if stage is None:
            return
        if self.needs_param_grads:
            raise ValueError(f"balance.method '{self.name}' edits parameter gradients, which DeepSpeed does not expose; "
                             f"use DDP (accelerate_configs/ddp_cpu_2proc.yaml or multi_gpu.yaml) or a setting of the "
                             f"method that needs no parameter-gradient edit")
        if stage not in self.zero_stages:
            works = ["DDP"] + [f"ZeRO-{s}" for s in self.zero_stages if s]  # ZeRO-0 is plain data parallel
            works = " and ".join([", ".join(works[:-1]), works[-1]] if len(works) > 1 else works)
            why = f" ({self.zero_stages_reason})" if self.zero_stages_reason else ""
            raise ValueError(f"balance.method '{self.name}' does not run under DeepSpeed ZeRO-{stage}{why}; it runs "
                             f"under {works}")

    # -- per step -----------------------------------------------------------------------------
    def forward(self, model, batch: dict):
        """The task's plain forward (classify: one keyword per modality; sft: the HF model's batch)."""
        if self.ctx.task_forward is None:
            return classify_forward(self.ctx, model, batch)
        return self.ctx.task_forward(model, batch)

    def loss(self, model, batch: dict, outputs) -> tuple[torch.Tensor, dict]:
        """The task's plain loss (classify: fused cross-entropy; sft: the LM loss on answer tokens)."""
        if self.ctx.task_loss is None:
            return classify_loss(batch, outputs)
        return self.ctx.task_loss(batch, outputs)

    def after_backward(self, model, step: int) -> None:
        """Runs after the gradient all-reduce, on steps where gradients sync, before clipping."""

    # -- per epoch ----------------------------------------------------------------------------
    def on_epoch_start(self, model, epoch: int) -> None:
        pass

    def on_epoch_end(self, model, epoch: int) -> None:
        pass

    def train_loader(self, epoch: int):
        """Data-stage methods return a prepared loader for this epoch; None keeps the default."""
        return None

    def epoch_length(self, loader, epoch: int) -> int:
        """Micro-batches the loop's `training_step` sees in one epoch (methods whose `train_epoch` makes
        several passes over the loader override it, so a stop part-way is resumed inside the epoch)."""
        return len(loader)

    train_epoch = None  # methods that reorganise an epoch set a callable (model, loader, epoch) that trains
    # through ctx.training_step and returns early when ctx.stop_requested()

    # -- checkpointing ------------------------------------------------------------------------
    def save_pretrained(self, model, path: str) -> None:
        """Called after the best model is written to `path` (best/): methods whose state changes what the
        model computes, but lives outside its weights (RollingQ's decoder rotation), write it there."""

    def load_pretrained(self, model, path: str) -> None:
        """Called after the best model is reloaded from `path` for the test read: the counterpart of
        `save_pretrained`."""

    def state_dict(self) -> dict:
        """Tensors and JSON values; saved in every checkpoint and restored on resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def describe(cls) -> dict:
        fields = {
            f.name: {"default": f.default if f.default is not dataclasses.MISSING else None,
                     "help": f.metadata.get("help", ""),
                     **{k: f.metadata[k] for k in ("min", "max", "choices") if k in f.metadata}}
            for f in dataclasses.fields(cls.config_class)
        }
        return {"name": cls.name, "stage": cls.stage, "paper": cls.paper, "tasks": list(cls.tasks),
                "supports_many_modalities": cls.supports_many_modalities, "hyperparameters": fields}


def hp(default, help_text: str, *, min=None, max=None, min_exclusive: bool = False, choices=None):
    """A hyperparameter field with its paper default, help text and valid range / choices (checked when the
    recipe is read, shown by `mmbalance methods`)."""
    meta = {"help": help_text}
    if min is not None:
        meta["min"], meta["min_exclusive"] = min, min_exclusive
    if max is not None:
        meta["max"] = max
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
