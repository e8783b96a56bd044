"""Run under `accelerate launch` with 2 CPU processes (tests/test_distributed.py).

Trains each method named on the command line on a tiny dataset, then compares every rank's final
parameters; rank 0 writes {method: {...}} to the report file. Parameters identical across ranks is
the invariant: each balancer reduces its statistics, so replicas never diverge.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_recipe  # noqa: E402

from mmbalance_llm.config import recipe_from_dict  # noqa: E402
from mmbalance_llm.train.trainer import Trainer  # noqa: E402


# Settings that make a 2-epoch run reach each method's mechanism instead of only its warm-up.
EXERCISE = {
    "sample_valuation": {"warmup_epochs": 1},
    "modality_valuation": {"warmup_epochs": 1},
    "ogm": {"modulation_starts": 0},
    "relearning": {"reinit_epoch": 1},
    "gblending": {"super_epoch": 1},
    "opm": {"modulation_starts": 0},    # past the official 6-epoch warm-up
    "greedy": {"starting_epoch": 0},    # past the official 2-epoch warm-up
}


def main() -> None:
    data, out, report_path = sys.argv[1:4]
    methods = sys.argv[4].split(",")
    report = {}
    for method in methods:
        try:
            raw = tiny_recipe(data, os.path.join(out, method), method, train={"epochs": 2})
            raw["balance"].update(EXERCISE.get(method, {}))
            trainer = Trainer(recipe_from_dict(raw))
            acc = trainer.accelerator
            captured = {}
            finish = trainer.finish

            def capture_then_finish():
                # The trained replicas, before `finish` reloads best/ (the same file on every rank, which would
                # hide any divergence).
                model = acc.unwrap_model(trainer.model)
                captured["flat"] = torch.cat([p.detach().float().flatten() for p in model.parameters()])
                return finish()

            trainer.finish = capture_then_finish
            final = trainer.fit()
            gathered = acc.gather(captured["flat"].unsqueeze(0))
            report[method] = {
                "max_param_diff": float((gathered - gathered[0]).abs().max()),
                "world_size": acc.num_processes,
                "distributed_type": acc.distributed_type.name,
                "final_world_size": final["world_size"],
                "test_accuracy": final["test"]["accuracy"],
            }
        except Exception as exc:  # keep going so one failing method does not hide the others
            report[method] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(report_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    # leave the process group cleanly: a live gloo group at interpreter exit can abort the process
    # ("terminate called without an active exception") after the report is written
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
