"""SFT step time of the one training loop against a hand-written loop, and the cost of collation after the
one-time preprocessing (tiny LLaVA + MokA, CPU, 1 thread).

Both loops train on the same padded batches, taken from the loop's own (preprocessed) train loader, so
preprocessing is excluded from both; rounds alternate between the two so a load change on a shared machine
hits both alike. The loop's step is `Trainer.training_step` (accelerate, the balancer hooks, clipping, the
schedule, counters); the hand-written one is forward, backward, clip, AdamW, schedule, zero_grad.

    python benchmarks/sft_step.py --rounds 7 --steps 8
writes benchmarks/results/sft_step.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--adapter", default="moka")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sft_step"))
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from mmbalance_llm.train.trainer import Trainer

    work = tempfile.mkdtemp(prefix="sft_step_")
    recipe = {
        "task": "sft", "output_dir": os.path.join(work, "run"), "adapter": a.adapter,
        "adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "model": {"name_or_path": os.path.join(work, "tiny_llava"), "build_tiny": "llava"},
        "data": {"train": os.path.join(work, "data", "train.json"), "validation": os.path.join(work, "data", "validation.json"),
                 "max_length": 128, "cache_dir": os.path.join(work, "cache"),
                 "generate": {"modalities": ["image"], "n_train": 128, "n_validation": 8, "n_test": 8, "seed": 0}},
        "train": {"num_train_epochs": 2, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "progress": False,
                  "logging_steps": 10},
    }
    trainer = Trainer(recipe)
    batches = [b for b in trainer.train_loader]

    # the hand-written loop: its own copy of the same model, same optimizer settings and schedule
    import peft

    hand_tr = Trainer({**recipe, "output_dir": os.path.join(work, "hand")})
    model = hand_tr.accelerator.unwrap_model(hand_tr.model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert isinstance(model, peft.PeftModel)

    def hand(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

    trainer.model.train(), model.train()
    times = {"loop": [], "hand": []}
    for r in range(a.rounds + 1):  # round 0 warms up both
        for name, step in (("loop", trainer.training_step), ("hand", hand)) if r % 2 == 0 else \
                (("hand", hand), ("loop", trainer.training_step)):
            tick = time.perf_counter()
            for i in range(a.steps):
                step(batches[i % len(batches)])
            if r:
                times[name].append((time.perf_counter() - tick) / a.steps)

    # collation of a later epoch: the loop's loader only pads preprocessed rows
    trainer.train_loader.set_epoch(1)
    tick = time.perf_counter()
    n = sum(1 for _ in trainer.train_loader)
    collate = (time.perf_counter() - tick) / n
    loop, hand_t = statistics.median(times["loop"]), statistics.median(times["hand"])
    res = {"adapter": a.adapter, "rounds": a.rounds, "steps_per_round": a.steps, "loop_step_s": loop,
           "hand_step_s": hand_t, "ratio": loop / hand_t, "ratios": [x / y for x, y in zip(times["loop"], times["hand"])],
           "collate_per_batch_s": collate, "collate_fraction_of_step": collate / loop}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump(res, fh, indent=2)
    md = ("| adapter | loop step / hand-written step | second-epoch collation / step |\n|---|---|---|\n"
          f"| {a.adapter} | {res['ratio']:.3f}x (median of {a.rounds} interleaved rounds; range "
          f"{min(res['ratios']):.2f}-{max(res['ratios']):.2f}) | {100 * res['collate_fraction_of_step']:.2f}% |\n")
    with open(a.out + ".md", "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
