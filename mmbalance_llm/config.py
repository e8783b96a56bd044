"""Recipes: YAML -> validated dataclasses, with `dotted.key=value` overrides.

A recipe has the sections `model`, `data`, `train`, `balance` and the key `output_dir`. Every key is a
dataclass field with help text; an unknown key is an error that names the closest valid key. The
`balance` section holds `method` plus that method's own hyperparameters, validated by the method's config.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class RecipeError(ValueError):
    """A recipe or an override is invalid. The message is one line naming the key."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


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
        default="default",
    )
    feature_dim: int = _help("Size of each modality's feature h_m (the fusion input).", default=64)
    hidden_dim: int = _help("Hidden width of MLP encoders and of Transformer encoders.", default=128)
    num_layers: int = _help("Layers per encoder (MLP hidden layers or Transformer blocks).", default=2)
    num_heads: int = _help("Attention heads of Transformer encoders.", default=4)
    dropout: float = _help("Dropout inside encoders.", default=0.0)
    fusion: str = _help(
        "Fusion of the classifier: 'concat' (split-head unimodal logits), 'sum', 'film' or 'gated'.", default="concat")
    fusion_layers: int = _help("Attention-fusion layers (attention-fusion architectures).", default=1)
    fusion_heads: int = _help("Heads per attention-fusion layer (attention-fusion architectures).", default=1)
    encoders: dict = _help(
        "Per-modality overrides, e.g. {audio: {encoder: transformer, num_layers: 1}}.", default_factory=dict
    )
    hf_encoder: Optional[Any] = _help(
        "For encoder='hf': a local model path or a config dict with 'model_type' (random weights).", default=None
    )
    num_classes: Optional[int] = _help("Number of classes; inferred from the training labels if unset.", default=None)


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
    num_workers: int = _help("DataLoader worker processes.", default=0)
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


@dataclass
class TrainConfig:
    epochs: int = _help("Training epochs.", default=20)
    batch_size: int = _help("Per-process batch size.", default=64)
    eval_batch_size: int = _help("Per-process evaluation batch size.", default=256)
    seed: int = _help("Seed for weights, data order, dropout and balancer randomness.", default=0)
    optimizer: str = _help("'adamw' or 'sgd'.", default="adamw")
    lr: float = _help("Learning rate.", default=1e-3)
    weight_decay: float = _help("Weight decay.", default=0.01)
    momentum: float = _help("SGD momentum.", default=0.9)
    scheduler: str = _help("'constant', 'cosine' or 'step'.", default="constant")
    warmup_steps: int = _help("Linear warm-up steps.", default=0)
    step_size_epochs: int = _help("For scheduler='step': decay every this many epochs.", default=10)
    gamma: float = _help("For scheduler='step': decay factor.", default=0.1)
    grad_clip: Optional[float] = _help("Clip the global gradient norm to this value.", default=None)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (passed to Accelerate).", default="no")
    eval_every_epochs: int = _help("Evaluate on validation every this many epochs.", default=1)
    save_steps: Optional[int] = _help("Also checkpoint every this many optimizer steps.", default=None)
    save_total_limit: Optional[int] = _help("Keep at most this many step checkpoints.", default=2)
    metric_for_best: str = _help("Validation metric that chooses the best checkpoint.", default="accuracy")
    resume_from: Optional[str] = _help("'latest' or a checkpoint path to resume from.", default=None)
    max_steps: Optional[int] = _help(
        "Stop after this many optimizer steps (the schedule is still planned for `epochs`); resume later.",
        default=None,
    )
    unimodal_metric: str = _help(
        "Unimodal accuracy: 'auto' (split head when the fusion has one, else linear probe), 'split', 'probe'.",
        default="auto",
    )
    shapley: bool = _help("Compute exact modality Shapley values and the imbalance score at each eval.", default=True)
    log_every_steps: int = _help("Log training loss every this many steps.", default=10)
    progress: bool = _help("Show tqdm progress bars (main process only).", default=True)
    plots: bool = _help("Write PNG curves at the end of training.", default=True)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: dict = field(default_factory=lambda: {"method": "none"})
    output_dir: str = "runs/run"
    task: str = "classify"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
_TOP_KEYS = ("model", "data", "train", "balance", "output_dir", "task")


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(valid))})"


def unknown_key_error(where: str, key: str, valid) -> RecipeError:
    return RecipeError(f"unknown recipe key '{where}{key}'{_closest(key, valid)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 0.0003). Values are parsed as YAML (safe_load)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form dotted.key=value")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{text}' has an empty key part")
    try:
        parsed = as_number(yaml.safe_load(value)) if value != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"override '{text}': '{part}' is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw


def as_number(value):
    """YAML 1.1 reads `3e-4` as a string; accept numeric strings where a number is expected."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(where: str, value, f: dataclasses.Field):
    """Light type checking so that `train.epochs=abc` fails here rather than deep in the trainer."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"recipe key '{where}' must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"recipe key '{where}' must be an integer, got {value!r}")
    elif isinstance(default, float):
        value = as_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"recipe key '{where}' must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise RecipeError(f"recipe key '{where}' must be a string, got {value!r}")
    return value


def build_section(name: str, cls, values) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"recipe section '{name}' must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(f"{name}.", key, fields)
        kwargs[key] = _coerce(f"{name}.{key}", value, fields[key])
    return cls(**kwargs)


def recipe_from_dict(raw: dict, *, validate_balance: bool = True) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping with sections model, data, train, balance")
    for key in raw:
        if key not in _TOP_KEYS:
            raise unknown_key_error("", key, _TOP_KEYS)
    sections = {name: build_section(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()}
    balance = dict(raw.get("balance") or {"method": "none"})
    balance.setdefault("method", "none")
    recipe = Recipe(
        **sections,
        balance=balance,
        output_dir=str(raw.get("output_dir", "runs/run")),
        task=str(raw.get("task", "classify")),
    )
    _check_choices(recipe)
    if validate_balance:
        from mmbalance_llm.balance import method_config  # validates method name and hyperparameters

        try:
            method_config(recipe.balance)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
    return recipe


_CHOICES = {
    ("model", "encoder"): ("default", "mlp", "transformer", "hf"),
    ("model", "fusion"): ("concat", "sum", "film", "gated", "attention"),
    ("train", "optimizer"): ("adamw", "sgd"),
    ("train", "scheduler"): ("constant", "cosine", "step"),
    ("train", "mixed_precision"): ("no", "bf16", "fp16"),
    ("train", "unimodal_metric"): ("auto", "split", "probe"),
}


def _check_choices(recipe: Recipe) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(recipe, section), key)
        if value not in allowed:
            raise RecipeError(f"recipe key '{section}.{key}' is {value!r}; choose one of {', '.join(allowed)}")
    for key in ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "eval_every_epochs"):
        if getattr(recipe.train, key) < 1:
            raise RecipeError(f"recipe key 'train.{key}' must be >= 1")
    if recipe.task != "classify":
        raise RecipeError(f"recipe key 'task' is {recipe.task!r}; this trainer runs task 'classify'")


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file '{path}' does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe file '{path}' is not valid YAML: {exc}".replace("\n", " ")) from None
    return raw or {}


def load_recipe(path_or_dict, overrides: Optional[list[str]] = None) -> Recipe:
    """Load a recipe from a YAML path (or a dict), apply `dotted.key=value` overrides and validate it."""
    raw = read_yaml(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike)) else path_or_dict
    return recipe_from_dict(apply_overrides(raw, overrides or []))


def dump_recipe(recipe: Recipe, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(recipe.to_dict(), fh, sort_keys=False)
