"""Trains each method named on the command line at per-process batch B (run under 1 or 2 processes) and
writes the final parameters (rank 0) to a JSON file, for tests/test_fidelity_ddp.py."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_recipe  # noqa: E402

from mmbalance_llm.config import recipe_from_dict  # noqa: E402
from mmbalance_llm.train.trainer import Trainer  # noqa: E402

# Settings that make a 2-epoch run reach each mechanism (re-sampling, re-balancing windows).
EXERCISE = {"sample_valuation": {"warmup_epochs": 1}, "greedy": {"starting_epoch": 0, "alpha": 0.001}}


def main() -> None:
    data, out, report_path, methods, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), int(sys.argv[5])
    report = {}
    for method in methods:
        raw = tiny_recipe(data, os.path.join(out, method), method,
                          train={"epochs": 2, "batch_size": batch, "shapley": False})
        raw["balance"].update(EXERCISE.get(method, {}))
        trainer = Trainer(recipe_from_dict(raw))
        final = trainer.fit()
        model = trainer.accelerator.unwrap_model(trainer.model)
        report[method] = {"params": torch.cat([p.detach().float().flatten() for p in model.parameters()]).tolist(),
                          "accuracy": final["test"]["accuracy"]}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(report_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh)


if __name__ == "__main__":
    main()
