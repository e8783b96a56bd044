"""Recipes: YAML -> validated dataclasses, with `dotted.key=value` overrides. One schema for every task.

A recipe names its `task` (`classify`: the multimodal classifiers; `sft`: multimodal-LLM fine-tuning) and
has the sections of that task (`mmbalance train RECIPE --help` lists them with help and defaults):

    classify: model (ModelConfig), data (DataConfig), train (TrainConfig), balance, output_dir
    sft:      model (SFTModelConfig), data (ChatDataConfig), train (TrainConfig), eval (SFTEvalConfig),
              adapter, adapter_config, balance, output_dir

`train` is shared by both tasks and uses the names of `transformers.TrainingArguments` where one exists
(`num_train_epochs`, `learning_rate`, `max_grad_norm`, ...); the project's older short names are accepted
as aliases (see `ALIASES`). Every value is checked (type, range, choices: declared once, next to each
field) before anything is written; an unknown key is one line naming the closest valid key.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from mmbalance_llm.recipe_values import (  # noqa: F401  (re-exported: the public names of recipe checking)
    RecipeError, _closest, _field_type, as_number, check_value, parse_override, unknown_key_error)


def _help(text: str, *, choices=None, min=None, max=None, min_exclusive=False, **kw):
    """A recipe field: help text plus the checks `validate_section` applies (choices, range)."""
    meta = {"help": text}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if min is not None:
        meta["min"], meta["min_exclusive"] = min, min_exclusive
    if max is not None:
        meta["max"] = max
    return field(metadata=meta, **kw)


TASKS = ("classify", "sft")


# ------------------------------------------------------------------------------------------ classify
@dataclass
class ModelConfig:
    architecture: str = _help(
        "Model family from the architecture registry (mmbalance_llm.models.registry): 'classifier' "
        "(MultimodalClassifier) or another registered one.",
        default="classifier",
    )
    encoder: str = _help(
        "Encoder for every modality: 'default' (MLP for [D] columns, Transformer for [T, D]), 'mlp', "
        "'transformer', or 'hf' (a Hugging Face AutoModel, see hf_encoder).",
        default="default", choices=("default", "mlp", "transformer", "hf"),
    )
    feature_dim: int = _help("Size of each modality's feature h_m (the fusion input).", default=64, min=1)
    hidden_dim: int = _help("Hidden width of MLP encoders and of Transformer encoders.", default=128, min=1)
    num_layers: int = _help("Layers per encoder (MLP hidden layers or Transformer blocks).", default=2, min=1)
    num_heads: int = _help("Attention heads of Transformer encoders.", default=4, min=1)
    dropout: float = _help("Dropout inside encoders.", default=0.0, min=0.0, max=0.999)
    fusion: str = _help(
        "Fusion of the classifier: 'concat' (split-head unimodal logits), 'sum', 'film' or 'gated'.", default="concat",
        choices=("concat", "sum", "film", "gated", "attention"))
    fusion_layers: int = _help("Attention-fusion layers (attention-fusion architectures).", default=1, min=1)
    fusion_heads: int = _help("Heads per attention-fusion layer (attention-fusion architectures).", default=1, min=1)
    encoders: dict = _help(
        "Per-modality overrides, e.g. {audio: {encoder: transformer, num_layers: 1}}.", default_factory=dict
    )
    hf_encoder: Optional[Any] = _help(
        "For encoder='hf': a local model path or a config dict with 'model_type' (random weights).", default=None
    )
    num_classes: Optional[int] = _help("Number of classes; inferred from the training labels if unset.", default=None,
                                       min=2)
    gradient_checkpointing: bool = _help(
        "Recompute the blocks of every Hugging Face encoder (encoder: hf) in backward: less activation memory, "
        "one more forward per step, the same gradients.", default=False)


@dataclass
class DataConfig:
    path: Optional[str] = _help(
        "A DatasetDict saved with save_to_disk, or a folder / dict of json, jsonl or parquet files per split.",
        default=None,
    )
    modalities: Optional[list] = _help(
        "Modality columns, in order. Unset: every column except the label.", default=None
    )
    label_column: str = _help("Integer class label column.", default="label")
    train_split: str = _help("Split used for training.", default="train")
    validation_split: str = _help("Split that chooses checkpoints and feeds held-out statistics.", default="validation")
    test_split: str = _help("Split read once at the end for the final report.", default="test")
    media: dict = _help(
        "Raw-media columns: {column: {kind: image|audio|video|text, processor: ..., ...}} (see "
        "mmbalance_llm.data.media_columns.MediaSpec); merged key by key over the data folder's media.json.",
        default_factory=dict,
    )
    media_cache_dir: Optional[str] = _help(
        "Where the preprocessed media splits are cached (default: <data.path>/.media_cache).", default=None
    )
    media_in_memory_gb: Optional[float] = _help(
        "Hold a preprocessed media split in memory when its cache is at most this many GiB (else read it "
        "memory-mapped, batch by batch); null: always memory-mapped.", default=2.0
    )


# ------------------------------------------------------------------------------------------ sft
FREEZE_COMPONENTS = ("tower", "projector", "language_model")


@dataclass
class SFTModelConfig:
    name_or_path: Optional[str] = _help(
        "A local model folder or a Hugging Face hub id (e.g. llava-hf/llava-1.5-7b-hf). A value that is not an "
        "existing folder is passed to from_pretrained unchanged (a hub id).", default=None)
    build_tiny: Optional[str] = _help(
        "Family of a tiny random-weight twin to build at name_or_path when that folder does not exist "
        "(llava, qwen2_vl, qwen2_5_vl, qwen2_audio); for CPU runs and tests.", default=None)
    dtype: str = _help("Weights dtype.", default="float32", choices=("float32", "bfloat16", "float16"))
    attn_implementation: Optional[str] = _help(
        "Attention kernel passed to from_pretrained (unset: the model's default).", default=None,
        choices=(None, "eager", "sdpa", "flash_attention_2", "flex_attention"))
    gradient_checkpointing: bool = _help("Recompute activations in backward (less memory, more time).", default=False)
    freeze: dict = _help(
        "Which parts stay frozen: {tower, projector, language_model} -> true/false. With an adapter, unfrozen "
        "tower/projector are trained as peft modules_to_save; language_model: false needs adapter: none.",
        default_factory=lambda: {"tower": True, "projector": True, "language_model": True})
    trust_remote_code: bool = _help("Allow model code from the hub folder (off unless you trust it).", default=False)
    revision: Optional[str] = _help("Hub revision (branch, tag or commit) of name_or_path.", default=None)


@dataclass
class ChatDataConfig:
    train: Optional[str] = _help("Training conversations: LLaVA JSON / sharegpt (json or jsonl).", default=None)
    validation: Optional[str] = _help("Validation conversations (chooses the best checkpoint).", default=None)
    test: Optional[str] = _help("Test conversations, read once at the end.", default=None)
    media_root: Optional[str] = _help("Folder media paths are relative to (default: each data file's folder).",
                                      default=None)
    max_length: int = _help("Token budget per sample (text is truncated; media tokens never are).", default=512,
                            min=8)
    generate: Optional[dict] = _help(
        "Write the synthetic instruction set at data.train's folder when missing: {modalities, n_train, "
        "n_validation, n_test, seed, text_prior, test_prior} (text_prior: fraction of media questions whose answer "
        "is the question's prior answer, so the text gives it away; test_prior: absent | misleading | same).", default=None)
    preprocessing_num_workers: Optional[int] = _help(
        "Processes for the one-time preprocessing (datasets.map num_proc).", default=None, min=1)
    cache_dir: Optional[str] = _help(
        "Where the preprocessed splits are cached (fingerprinted by data, processor and settings); "
        "default: the datasets cache folder.", default=None)
    video_fps: float = _help("Frames per second sampled from a video file (Qwen2-VL / Qwen2.5-VL video).",
                             default=2.0, min=0.0, min_exclusive=True)
    video_max_frames: int = _help("At most this many frames per video.", default=16, min=1)


@dataclass
class SFTEvalConfig:
    accuracy: str = _help(
        "Answer accuracy: 'options' scores every answer option by its summed log-probability (records need "
        "options + answer); 'generate' compares the first word of a greedy reply with the answer.",
        default="options", choices=("options", "generate"))
    max_new_tokens: int = _help("Generation length for accuracy: generate.", default=8, min=1)
    max_samples: Optional[int] = _help("Evaluate at most this many validation / test samples.", default=None, min=1)
    diagnostics_max_samples: Optional[int] = _help(
        "Per-modality diagnostics (reliance, adapter gradient share, attention share; logged as diagnostics/...) at "
        "every validation on the first this many validation samples (unset: off).", default=None, min=1)


# ------------------------------------------------------------------------------------------ shared
@dataclass
class TrainConfig:
    num_train_epochs: int = _help("Training epochs.", default=20, min=1)
    per_device_train_batch_size: int = _help("Per-process training batch size.", default=64, min=1)
    per_device_eval_batch_size: int = _help("Per-process evaluation batch size.", default=256, min=1)
    seed: int = _help("Seed for weights, data order, dropout and balancer randomness.", default=0, min=0)
    optimizer: str = _help("'adamw' or 'sgd'.", default="adamw", choices=("adamw", "sgd"))
    learning_rate: float = _help("Peak learning rate.", default=1e-3, min=0.0, min_exclusive=True)
    weight_decay: float = _help("Weight decay (not applied to biases and norms).", default=0.01, min=0.0)
    momentum: float = _help("SGD momentum.", default=0.9, min=0.0, max=1.0)
    lr_scheduler_type: str = _help(
        "'constant', 'linear', 'cosine' (transformers' schedules, after warm-up) or 'step'.", default="constant",
        choices=("constant", "linear", "cosine", "step"))
    warmup_steps: int = _help("Linear warm-up optimizer steps (takes precedence over warmup_ratio).", default=0, min=0)
    warmup_ratio: float = _help("Linear warm-up as a fraction of all optimizer steps.", default=0.0, min=0.0, max=1.0)
    step_size_epochs: int = _help("For lr_scheduler_type='step': decay every this many epochs.", default=10, min=1)
    gamma: float = _help("For lr_scheduler_type='step': decay factor.", default=0.1, min=0.0, max=1.0)
    max_grad_norm: Optional[float] = _help("Clip the global gradient norm to this value (unset: no clipping).",
                                           default=None, min=0.0, min_exclusive=True)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1, min=1)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (passed to Accelerate).", default="no",
                                 choices=("no", "bf16", "fp16"))
    dataloader_num_workers: int = _help("DataLoader worker processes.", default=0, min=0)
    eval_every_epochs: int = _help("Evaluate on validation every this many epochs.", default=1, min=1)
    save_steps: Optional[int] = _help("Also checkpoint every this many optimizer steps.", default=None, min=1)
    save_total_limit: Optional[int] = _help("Keep at most this many step checkpoints.", default=2, min=1)
    metric_for_best_model: str = _help(
        "Validation metric that chooses the best checkpoint (loss and imbalance: lower is better).",
        default="accuracy")
    resume_from_checkpoint: Optional[str] = _help("'latest' (the newest complete checkpoint) or a checkpoint path.",
                                                  default=None)
    max_steps: Optional[int] = _help(
        "Train for this many optimizer steps in all (overrides num_train_epochs; the schedule is planned for it).",
        default=None, min=1)
    stop_after_steps: Optional[int] = _help(
        "Checkpoint and stop after this many optimizer steps, without the final test (the schedule is still "
        "planned for the whole run); continue with resume_from_checkpoint=latest.", default=None, min=1)
    unimodal_metric: str = _help(
        "Classify: unimodal accuracy from 'auto' (split head when the fusion has one, else linear probe), "
        "'split', 'probe'.", default="auto", choices=("auto", "split", "probe"))
    shapley: bool = _help("Classify: exact modality Shapley values and the imbalance score at each eval.",
                          default=True)
    early_stopping_patience: Optional[int] = _help(
        "Stop after this many evaluations without a better train.metric_for_best_model (the run then finishes: "
        "best model, test read once); unset: train to the end.", default=None, min=1)
    logging_steps: int = _help("Log the training loss every this many optimizer steps.", default=10, min=1)
    progress: bool = _help("Show a tqdm progress bar (main process only).", default=True)
    plots: bool = _help("Write PNG curves at the end of training.", default=True)
    num_threads: Optional[int] = _help(
        "CPU threads torch uses in each process (intra-op). null: OMP_NUM_THREADS when set, else 1 per process "
        "(measured fastest for the tiny quick-start models, and it does not collapse when other jobs share "
        "the CPUs; docs/speed.md). Set it higher for large models on an otherwise idle CPU.",
        default=None, min=1)
    report_to: Optional[Any] = _help(
        "Experiment trackers (transformers.TrainingArguments.report_to): a name or a list of names from "
        "tensorboard (events in <output_dir>/tensorboard), wandb, mlflow, comet_ml, clearml, dvclive, aim, swanlab, "
        "trackio; 'all' (every installed one) or 'none'. Through Accelerate's trackers; metrics.jsonl is always "
        "written.", default="tensorboard",
        choices=("tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "aim", "swanlab", "trackio",
                 "all", "none"))
    eval_strategy: str = _help(
        "When to evaluate on validation (and keep the best model): 'epoch' (every train.eval_every_epochs), "
        "'steps' (every train.eval_steps optimizer steps, and when training ends) or 'no' (once, when training "
        "ends).", default="epoch", choices=("epoch", "steps", "no"))
    eval_steps: Optional[int] = _help(
        "For eval_strategy='steps': evaluate every this many optimizer steps (unset: train.logging_steps).",
        default=None, min=1)
    save_strategy: str = _help(
        "Checkpoints: 'epoch' (at every epoch end, plus every train.save_steps when set), 'steps' (every "
        "train.save_steps only) or 'no' (none, except the one train.stop_after_steps leaves to resume from).",
        default="epoch", choices=("epoch", "steps", "no"))


# Defaults that differ by task (the SFT ones follow common LoRA fine-tuning practice).
TASK_DEFAULTS = {
    "sft": {"train": {"num_train_epochs": 3, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32,
                      "learning_rate": 2e-4, "weight_decay": 0.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03,
                      "max_grad_norm": 1.0}},
}

# Other spellings of a key -> its name here. The project's first schemas and common HF spellings.
ALIASES = {
    ("train", "epochs"): ("train", "num_train_epochs"),
    ("train", "batch_size"): ("train", "per_device_train_batch_size"),
    ("train", "eval_batch_size"): ("train", "per_device_eval_batch_size"),
    ("train", "lr"): ("train", "learning_rate"),
    ("train", "scheduler"): ("train", "lr_scheduler_type"),
    ("train", "grad_clip"): ("train", "max_grad_norm"),
    ("train", "grad_accum"): ("train", "gradient_accumulation_steps"),
    ("train", "log_every_steps"): ("train", "logging_steps"),
    ("train", "log_every"): ("train", "logging_steps"),
    ("train", "metric_for_best"): ("train", "metric_for_best_model"),
    ("train", "resume_from"): ("train", "resume_from_checkpoint"),
    ("train", "num_workers"): ("train", "dataloader_num_workers"),
    ("data", "num_workers"): ("train", "dataloader_num_workers"),
    ("eval", "batch_size"): ("train", "per_device_eval_batch_size"),
}
# Keys of the first SFT schema that no longer do anything: accepted with a one-line note.
RETIRED = {
    ("data", "media_cache"): "media are processed once by the cached preprocessing; the key does nothing",
    ("data", "precheck"): "every sample is preprocessed (and so checked) once before training; the key does nothing",
}


@dataclass
class Recipe:
    model: Any = field(default_factory=ModelConfig)
    data: Any = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: dict = field(default_factory=lambda: {"method": "none"})
    output_dir: str = "runs/run"
    task: str = "classify"
    adapter: Optional[str] = None            # sft: moka | imod | lora | none
    adapter_config: Optional[dict] = None    # sft: MokaConfig / ImodConfig / LoraConfig fields
    eval: Optional[SFTEvalConfig] = None     # sft

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.task != "sft":
            for key in ("adapter", "adapter_config", "eval"):
                out.pop(key)
        return out


SECTIONS = {
    "classify": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig},
    "sft": {"model": SFTModelConfig, "data": ChatDataConfig, "train": TrainConfig, "eval": SFTEvalConfig},
}
TOP_KEYS = {
    "classify": ("task", "model", "data", "train", "balance", "output_dir"),
    "sft": ("task", "model", "data", "train", "eval", "adapter", "adapter_config", "balance", "output_dir"),
}
ADAPTERS = ("moka", "imod", "lora", "none")
MOKA_ONLY_FIELDS = ("modalities", "cross_attention_weight", "question_after_media")
IMOD_ONLY_FIELDS = ("decouple_weight", "align_weight", "shared_ratio", "shared_ratio_growth", "text_ratio",
                    "partition_seed", "num_layers", "add_to_model_loss")  # = adapters.imod.IMOD_ONLY_FIELDS


def _same_setting(section: str, key: str) -> list:
    """Every spelling (section, key) of the setting `section.key` names: its canonical key and its aliases."""
    canonical = ALIASES.get((section, key), (section, key))
    return [canonical] + [old for old, new in ALIASES.items() if new == canonical]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides. An override replaces the setting under whatever spelling the recipe
    used (`train.epochs=5` on a recipe that says `num_train_epochs: 15`)."""
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        path, value = parse_override(text)
        if len(path) == 2:
            for sec, key in _same_setting(*path):
                node = raw.get(sec)
                if (sec, key) != tuple(path) and isinstance(node, dict):
                    node.pop(key, None)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"override '{text}': '{part}' is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw


def build_section(name: str, cls, values, origin: Optional[dict] = None) -> Any:
    """`origin` maps a key to the spelling the recipe used (an alias), so errors name what the user wrote."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"recipe section '{name}' must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = [old for (sec, old), _ in ALIASES.items() if sec == name]
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(f"{name}.", key, list(fields) + aliases)
        where = (origin or {}).get((name, key), f"{name}.{key}")
        kwargs[key] = check_value(where, value, fields[key])
    return cls(**kwargs)


def _resolve_aliases(raw: dict, task: str, origin: dict) -> dict:
    """Move aliased keys to their names here (`origin` records the spelling used); drop retired keys with a
    note. Both spellings at once: error."""
    raw = copy.deepcopy(raw)
    for (section, old), (new_section, new) in ALIASES.items():
        node = raw.get(section)
        if not isinstance(node, dict) or old not in node:
            continue
        if section == "eval" and task != "sft":
            continue
        if raw.get(new_section) is None:
            raw[new_section] = {}
        target = raw[new_section]
        if not isinstance(target, dict):
            continue
        if new in target:
            raise RecipeError(f"recipe keys '{section}.{old}' and '{new_section}.{new}' name the same setting; keep one")
        target[new] = node.pop(old)
        origin[(new_section, new)] = f"{section}.{old}"
    for (section, old), why in RETIRED.items():
        node = raw.get(section)
        if isinstance(node, dict) and old in node:
            node.pop(old)
            print(f"[mmbalance] note: recipe key '{section}.{old}' is retired: {why}", file=sys.stderr)
    return raw


def _task_defaults(task: str, raw: dict) -> dict:
    out = copy.deepcopy(raw)
    for section, values in TASK_DEFAULTS.get(task, {}).items():
        node = out.get(section)
        if node is None:
            node = out[section] = {}
        if isinstance(node, dict):
            for k, v in values.items():
                node.setdefault(k, v)
    return out


def recipe_from_dict(raw: dict, *, validate_balance: bool = True) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    task = raw.get("task", "classify")
    if task not in TASKS:
        raise RecipeError(f"recipe key 'task' is {task!r}; choose one of {', '.join(TASKS)}")
    origin: dict = {}
    raw = _task_defaults(task, _resolve_aliases(raw, task, origin))
    for key in raw:
        if key not in TOP_KEYS[task]:
            other = [t for t in TASKS if key in TOP_KEYS[t]]
            if other:
                raise RecipeError(f"recipe key '{key}' belongs to task {other[0]!r}; this recipe has task {task!r}")
            raise unknown_key_error("", key, TOP_KEYS[task])
    sections = {name: build_section(name, cls, raw.get(name), origin) for name, cls in SECTIONS[task].items()}
    balance = raw.get("balance") or {"method": "none"}
    if not isinstance(balance, dict):
        raise RecipeError(f"recipe section 'balance' must be a mapping, got {type(balance).__name__}")
    balance = dict(balance)
    balance.setdefault("method", "none")
    output_dir = raw.get("output_dir", "runs/run")
    if not isinstance(output_dir, str) or not output_dir:
        raise RecipeError(f"recipe key 'output_dir' must be a folder path, got {output_dir!r}")
    recipe = Recipe(**sections, balance=balance, output_dir=output_dir, task=task)
    if task == "sft":
        _check_sft(recipe, raw)
    if validate_balance:
        from mmbalance_llm.balance import method_config  # validates method name and hyperparameters

        try:
            cls, _ = method_config(recipe.balance)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        if task not in cls.tasks:
            others = ", ".join(m for m in _methods_for(task))
            raise RecipeError(f"balance.method '{cls.name}' supports task {', '.join(cls.tasks)}; "
                              f"for task {task!r} choose one of: {others}")
    return recipe


def _methods_for(task: str) -> list:
    from mmbalance_llm.balance import available_methods, method_class

    return [m for m in available_methods() if task in method_class(m).tasks]


def _check_sft(recipe: Recipe, raw: dict) -> None:
    recipe.adapter = raw.get("adapter", "moka")
    if recipe.adapter not in ADAPTERS:
        raise RecipeError(f"recipe key 'adapter' is {recipe.adapter!r}; choose one of {', '.join(ADAPTERS)}")
    ac = raw.get("adapter_config") or {}
    if not isinstance(ac, dict):
        raise RecipeError(f"recipe key 'adapter_config' must be a mapping, got {type(ac).__name__}")
    recipe.adapter_config = dict(ac)
    m, d = recipe.model, recipe.data
    if not m.name_or_path:
        raise RecipeError("recipe key 'model.name_or_path' is required for task 'sft' (a folder or a hub id)")
    for comp, frozen in m.freeze.items():
        if comp not in FREEZE_COMPONENTS:
            raise unknown_key_error("model.freeze.", comp, FREEZE_COMPONENTS)
        if not isinstance(frozen, bool):
            raise RecipeError(f"recipe key 'model.freeze.{comp}' must be true or false, got {frozen!r}")
    m.freeze = {**{c: True for c in FREEZE_COMPONENTS}, **m.freeze}
    if recipe.adapter != "none" and not m.freeze["language_model"]:
        raise RecipeError("model.freeze.language_model: false with an adapter would train the whole LLM; "
                          "use adapter: none for full fine-tuning")
    for split in ("train", "validation"):
        if not getattr(d, split):
            raise RecipeError(f"recipe key 'data.{split}' is required for task 'sft'")
    if d.generate is not None:
        allowed = ("modalities", "n_train", "n_validation", "n_test", "seed", "fmt", "text_prior", "test_prior")
        for k in d.generate:
            if k not in allowed:
                raise unknown_key_error("data.generate.", k, allowed)
        cue = d.generate.get("text_prior", 0.0)
        if isinstance(cue, bool) or not isinstance(cue, (int, float)) or not 0.0 <= cue <= 1.0:
            raise RecipeError(f"recipe key 'data.generate.text_prior' must be a number in [0, 1], got {cue!r}")
        from mmbalance_llm.data.mm_synthetic import TEST_PRIORS

        if d.generate.get("test_prior", "absent") not in TEST_PRIORS:
            raise RecipeError(f"recipe key 'data.generate.test_prior' must be one of {', '.join(TEST_PRIORS)}, "
                              f"got {d.generate['test_prior']!r}")
    if recipe.adapter != "none":
        cls = adapter_config_class(recipe)  # field names checked now, not after the model is loaded
        if recipe.adapter == "imod":  # and IMoD's values too (the config needs no model), before anything is written
            try:
                cls(**recipe.adapter_config)
            except (TypeError, ValueError) as exc:
                raise RecipeError(f"adapter_config: {str(exc).splitlines()[0]}") from None


def adapter_config_class(recipe: Recipe):
    """MokaConfig, ImodConfig or peft.LoraConfig for the recipe's adapter; unknown adapter_config fields are
    errors. MokA-only (IMoD-only) fields are dropped for the other adapters, so one recipe switches with
    `adapter=lora`."""
    import peft

    from mmbalance_llm.adapters.imod import ImodConfig
    from mmbalance_llm.adapters.moka import MokaConfig

    cls = {"moka": MokaConfig, "imod": ImodConfig}.get(recipe.adapter, peft.LoraConfig)
    fields = {f.name for f in dataclasses.fields(cls)}
    for owner, label, only in ((MokaConfig, "MokA", MOKA_ONLY_FIELDS), (ImodConfig, "IMoD", IMOD_ONLY_FIELDS)):
        if cls is owner:
            continue
        dropped = sorted(set(recipe.adapter_config) & set(only))
        if dropped:
            print(f"[mmbalance] adapter={recipe.adapter}: ignoring {label}-only adapter_config keys {dropped}",
                  file=sys.stderr)
            recipe.adapter_config = {k: v for k, v in recipe.adapter_config.items() if k not in only}
    for k in recipe.adapter_config:
        if k not in fields:
            raise RecipeError(f"unknown recipe key 'adapter_config.{k}' for {cls.__name__}{_closest(k, fields)}")
    return cls


def read_yaml(path: str) -> dict:
    if os.path.isdir(path) or not os.path.exists(path):
        raise RecipeError(f"recipe file '{path}' does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe file '{path}' is not valid YAML: {exc}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe file '{path}' must hold a mapping of sections, got a {type(raw).__name__}")
    return raw


def load_recipe(path_or_dict, overrides: Optional[list[str]] = None) -> Recipe:
    """Load a recipe from a YAML path (or a dict), apply `dotted.key=value` overrides and validate it."""
    raw = read_yaml(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike)) else path_or_dict
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(raw).__name__}")
    return recipe_from_dict(apply_overrides(raw, overrides or []))


def dump_recipe(recipe: Recipe, path: str) -> None:
    from mmbalance_llm.train.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def describe_task(task: str) -> str:
    """The keys of a task's recipe with their help and defaults (`mmbalance train RECIPE --help`)."""
    lines = [f"Recipe keys for task '{task}' (override any as dotted.key=value):"]
    defaults = TASK_DEFAULTS.get(task, {})
    for name, cls in SECTIONS[task].items():
        lines.append(f"\n{name}:")
        for f in dataclasses.fields(cls):
            default = defaults.get(name, {}).get(
                f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            extra = f"  [choices: {', '.join(str(c) for c in f.metadata['choices'] if c is not None)}]" \
                if "choices" in f.metadata else ""
            lines.append(f"  {name}.{f.name} = {default!r}: {f.metadata.get('help', '')}{extra}")
    if task == "sft":
        lines += ["\nadapter = 'moka': moka | imod | lora | none (full fine-tuning)",
                  "adapter_config = {}: MokaConfig / ImodConfig / peft.LoraConfig fields (targets default to the "
                  "LLM's projections)"]
    lines += ["balance.method = 'none': a balancing method (`mmbalance methods`) and its hyperparameters",
              "output_dir = 'runs/run': where the run writes",
              "\nAliases accepted: " + ", ".join(f"{s}.{o} -> {ns}.{n}" for (s, o), (ns, n) in ALIASES.items())]
    return "\n".join(lines)
