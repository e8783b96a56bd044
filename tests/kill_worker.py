"""A training run that SIGKILLs itself at a chosen moment (tests/test_kill_resume.py).

    python tests/kill_worker.py RECIPE.json KILL
KILL: `none`; `step:N` (right after the N-th optimizer step); `checkpoint:N` (inside the N-th checkpoint
write: the partial folder holds the Accelerate state, the balancer state, the best-model copy and
trainer_state are not yet there, nothing is renamed into place).
"""
from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    recipe_path, kill = sys.argv[1:3]
    from mmbalance_llm.train import checkpoint as ckpt
    from mmbalance_llm.train.trainer import Trainer

    with open(recipe_path) as fh:
        recipe = json.load(fh)
    kind, _, n = kill.partition(":")
    n = int(n or 0)
    if kind == "checkpoint":
        real, calls = ckpt.save_balancer_state, {"n": 0}

        def save_then_die(state, folder):
            calls["n"] += 1
            if calls["n"] == n:
                die()
            return real(state, folder)

        ckpt.save_balancer_state = save_then_die
    trainer = Trainer(recipe)
    if kind == "step":
        step = trainer.training_step

        def step_then_die(batch):
            step(batch)
            if trainer.state["global_step"] == n and trainer.accelerator.sync_gradients:
                die()

        trainer.training_step = step_then_die
        trainer.ctx.training_step = step_then_die
    trainer.fit()


if __name__ == "__main__":
    main()
