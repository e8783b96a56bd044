"""What a task gives the training loop. The loop (train/trainer.py) owns accelerate, the optimizer step,
schedules, logging, checkpoints, resume and model choice; a task owns its data, its model, what a batch
means and how to evaluate and save it."""
from __future__ import annotations

from typing import Optional


class Task:
    name = ""
    find_unused_parameters = False  # DDP: some trainable parameters get no gradient on some steps
    eval_at_start = False           # evaluate validation before the first step (the "before training" row)
    tie_break: Optional[str] = None  # a metric (lower is better) that breaks ties of metric_for_best_model
    lower_is_better = ("loss", "imbalance")

    def __init__(self, recipe):
        self.recipe = recipe
        self.notes: list[str] = []
        self.modalities: list = []
        self.num_classes: Optional[int] = None
        self.train_dataset = None

    # -- building (everything here runs before the output folder is touched) -------------------------
    def prepare_assets(self) -> None:
        """Main process only, before `load_data`: create inputs the recipe asks to generate."""

    def load_data(self, datasets=None) -> None:
        raise NotImplementedError

    def build_model(self, balancer, model=None):
        raise NotImplementedError

    def metric_names(self) -> list:
        """Scalar validation metrics that `train.metric_for_best_model` may name."""
        raise NotImplementedError

    def collate(self, items):
        raise NotImplementedError

    def check_engine(self, accelerator) -> None:
        """Refuse, in one line, an engine the task's model cannot train under (called before the engine is built)."""

    def setup(self, accelerator, model, make_loader=None) -> None:
        """After `accelerator.prepare`: `make_loader(dataset, shuffle, batch_size, collate_fn)` builds a
        seeded DataLoader (not yet prepared)."""
        self.accelerator = accelerator

    # -- a step ------------------------------------------------------------------------------------
    def forward(self, model, batch):
        raise NotImplementedError

    def loss(self, batch, outputs):
        raise NotImplementedError

    def extra_loss(self, outputs):
        """A loss the model itself asks for on top of the method's (e.g. detached probe heads), or None."""
        return None

    # -- evaluation and saving ---------------------------------------------------------------------
    def evaluate(self, model, split: str) -> dict:
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """The console line of one evaluation."""
        keys = [k for k in ("loss", "accuracy", "macro_f1", "imbalance") if isinstance(metrics.get(k), (int, float))]
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)

    def save_best(self, accelerator, model, path: str) -> None:
        raise NotImplementedError

    def load_best(self, accelerator, model, path: str) -> None:
        raise NotImplementedError

    def final_extras(self, model) -> dict:
        """Extra entries of final_metrics.json, computed after the test split was read."""
        return {}

    def plots(self, output_dir: str, metrics_path: str, state: dict, title: str) -> None:
        pass
