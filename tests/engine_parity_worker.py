"""Run under `accelerate launch` (2 CPU processes, DDP or DeepSpeed): trains each method named on the
command line for a few optimizer steps and rank 0 saves the trained parameters by name
(`{method}.pt` in OUT) and writes `errors.json` ({method: {"error": one line, "trace": ...}}) for the
methods that failed or were refused. tests/test_deepspeed_parity.py compares the DDP and DeepSpeed files.

    accelerate launch --config_file CONFIG tests/engine_parity_worker.py DATA OUT METHODS STEPS

STEPS: optimizer steps (0: 2 epochs). METHODS is comma-separated; `name@key=value@...` sets balance
hyperparameters (values read as YAML), e.g. `mmpareto@gradient_space=feature`; the file is then named after
the whole spec.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_recipe  # noqa: E402
from ddp_worker import EXERCISE  # noqa: E402

from mmbalance_llm.config import recipe_from_dict  # noqa: E402
from mmbalance_llm.train.trainer import Trainer  # noqa: E402


def main() -> None:
    data, out, methods, steps = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
    errors = {}
    os.makedirs(out, exist_ok=True)
    for spec in methods:
        method, *settings = spec.split("@")
        try:
            train = {"max_steps": steps} if steps else {"epochs": 2}  # STEPS 0: the 2 epochs of the README table
            raw = tiny_recipe(data, os.path.join(out, "runs", spec), method, train={**train, "shapley": False})
            raw["balance"].update(EXERCISE.get(method, {}))
            raw["balance"].update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in settings)})
            trainer = Trainer(recipe_from_dict(raw))
            captured = {}
            finish = trainer.finish

            def capture_then_finish():
                # the trained weights, before `finish` reloads best/; under ZeRO-3 gathered from the shards
                acc = trainer.accelerator
                state = acc.get_state_dict(trainer.model)  # a collective; ZeRO-3 returns it on rank 0 only
                captured["params"] = {k: v.detach().float().cpu().clone() for k, v in (state or {}).items()}
                return finish()

            trainer.finish = capture_then_finish
            trainer.fit()
            if trainer.accelerator.is_main_process:
                torch.save(captured["params"], os.path.join(out, f"{spec}.pt"))
        except Exception as exc:  # keep going so one failing method does not hide the others
            errors[spec] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "errors.json"), "w", encoding="utf-8") as fh:
            json.dump(errors, fh, indent=2)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
