"""Run under `accelerate launch` with 2 CPU processes (tests/test_probe.py): one short training, then
every rank writes the test metrics it computed to OUT/rank<r>.json, so the test can check that the
gathered features give every rank the same probe accuracy over the whole split."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_recipe  # noqa: E402

from mmbalance_llm.config import recipe_from_dict  # noqa: E402
from mmbalance_llm.train.trainer import Trainer  # noqa: E402


def main() -> None:
    data, out = sys.argv[1:3]
    trainer = Trainer(recipe_from_dict(tiny_recipe(data, os.path.join(out, "run"), train={"epochs": 1})))
    final = trainer.fit()
    rank = trainer.accelerator.process_index
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump({"test": final["test"], "world_size": trainer.accelerator.num_processes}, fh)


if __name__ == "__main__":
    main()
