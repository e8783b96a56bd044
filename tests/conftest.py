"""Shared fixtures: tiny synthetic datasets (made once per session) and a one-call trainer.

Every test runs offline; the HF variables are set here as well as in .ci/run.
"""
from __future__ import annotations

import os

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TINY_SIZES = dict(train_size=256, validation_size=128, test_size=128, num_classes=4)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """`tiny_data(preset="av_imbalance", **spec_overrides)` -> path of a small DatasetDict on disk."""
    from mmbalance_llm.data.synthetic import preset_spec, write_synthetic

    cache = {}

    def make(preset: str = "av_imbalance", **overrides) -> str:
        key = (preset, tuple(sorted(overrides.items())))
        if key not in cache:
            spec = preset_spec(preset, **{**TINY_SIZES, **overrides})
            cache[key] = write_synthetic(str(tmp_path_factory.mktemp(f"data-{preset}")), spec)
        return cache[key]

    return make


def tree_digest(folder) -> dict:
    """sha256 of every file under `folder`, by relative path: "an earlier run stays byte-identical"."""
    import hashlib

    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


class OneProcess:
    """The slice of an Accelerator the balancers use, for one process (no global Accelerate state)."""

    num_processes = 1
    process_index = 0
    distributed_type = type("DistributedType", (), {"name": "NO"})()

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def unwrap_model(self, model):
        return model

    def gather_for_metrics(self, x):
        return x

    def print(self, *args):
        pass


def tiny_recipe(data_path: str, output_dir: str, method: str = "none", **sections) -> dict:
    """A small recipe dict: 2 epochs, small MLP encoders, no progress bar or plots."""
    raw = {
        "model": {"feature_dim": 16, "hidden_dim": 32, "num_layers": 1},
        "data": {"path": data_path},
        "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 128, "lr": 3e-3, "seed": 0, "progress": False,
                  "plots": False},
        "balance": {"method": method},
        "output_dir": output_dir,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


@pytest.fixture
def run_tiny(tmp_path):
    """`run_tiny(data_path, method="none", balance={...}, train={...}, model={...}, data={...})` trains
    in-process and returns (trainer, final_metrics)."""
    from mmbalance_llm.config import recipe_from_dict
    from mmbalance_llm.train.trainer import Trainer

    counter = {"n": 0}

    def run(data_path: str, method: str = "none", balance: dict | None = None, **sections):
        counter["n"] += 1
        out = str(tmp_path / f"run{counter['n']}")
        raw = tiny_recipe(data_path, out, method, **sections)
        raw["balance"].update(balance or {})
        trainer = Trainer(recipe_from_dict(raw))
        return trainer, trainer.fit()

    return run
