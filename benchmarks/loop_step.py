"""Step time of the one training loop against a hand-written loop, for both tasks, and (SFT) the cost of
collation after the one-time preprocessing. CPU, 1 thread.

* `--task sft`: tiny LLaVA + MokA (or `--adapter lora`) on the generated image instruction set.
* `--task classify`: the synthetic recipe's MLP encoders (`recipes/synthetic/baseline.yaml` sizes) on
  `av_imbalance`, or `--encoder transformer` on the `tokens` preset.

Both loops train on the same batches, taken from the loop's own train loader, so data loading and
preprocessing are excluded from both; rounds alternate between the two so a load change on a shared machine
hits both alike. The loop's step is `Trainer.training_step` (accelerate, the balancer hooks, clipping, the
schedule, counters, and a metrics.jsonl + TensorBoard row every 10 steps; also timed with those rows switched off);
the hand-written one is forward, loss, backward, (clip), AdamW, (schedule), zero_grad.

    python benchmarks/loop_step.py --task sft --rounds 7 --steps 8
    python benchmarks/loop_step.py --task classify --rounds 7 --steps 32
write benchmarks/results/loop_step_<task>.{json,md}.
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


def sft_setup(work: str, adapter: str):
    import peft
    import torch

    from mmbalance_llm.train.trainer import Trainer

    recipe = {
        "task": "sft", "output_dir": os.path.join(work, "run"), "adapter": adapter,
        "adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "model": {"name_or_path": os.path.join(work, "tiny_llava"), "build_tiny": "llava"},
        "data": {"train": os.path.join(work, "data", "train.json"), "validation": os.path.join(work, "data", "validation.json"),
                 "max_length": 128, "cache_dir": os.path.join(work, "cache"),
                 "generate": {"modalities": ["image"], "n_train": 128, "n_validation": 8, "n_test": 8, "seed": 0}},
        "train": {"num_train_epochs": 2, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "progress": False,
                  "logging_steps": 10},
    }
    trainer = Trainer(recipe)
    hand_tr = Trainer({**recipe, "output_dir": os.path.join(work, "hand")})
    model = hand_tr.accelerator.unwrap_model(hand_tr.model)
    assert isinstance(model, peft.PeftModel)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # the loop's cosine schedule costs the same

    def hand(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

    return trainer, model, hand


def classify_setup(work: str, encoder: str):
    import torch
    import torch.nn.functional as F

    from mmbalance_llm.data.synthetic import preset_spec, write_synthetic
    from mmbalance_llm.train.trainer import Trainer

    preset = "tokens" if encoder == "transformer" else "av_imbalance"
    data = write_synthetic(os.path.join(work, "data"), preset_spec(preset, train_size=2048, validation_size=256,
                                                                     test_size=256))
    recipe = {"model": {"encoder": encoder, "feature_dim": 64, "hidden_dim": 128, "num_layers": 2},
              "data": {"path": data}, "balance": {"method": "none"},
              "train": {"num_train_epochs": 2, "per_device_train_batch_size": 64, "learning_rate": 1e-3,
                        "progress": False, "plots": False, "logging_steps": 10}}
    trainer = Trainer({**recipe, "output_dir": os.path.join(work, "run")})
    hand_tr = Trainer({**recipe, "output_dir": os.path.join(work, "hand")})
    model = hand_tr.accelerator.unwrap_model(hand_tr.model)
    mods = hand_tr.task.modalities
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3)

    def hand(batch):
        loss = F.cross_entropy(model(**{m: batch[m] for m in mods}).logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()

    return trainer, model, hand


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=("sft", "classify"), default="sft")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--adapter", default="moka", help="sft: moka | lora")
    p.add_argument("--encoder", default="mlp", help="classify: mlp | transformer")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="loop_step_")
    if a.task == "sft":
        trainer, model, hand = sft_setup(work, a.adapter)
        label = f"sft, tiny LLaVA + {a.adapter}"
    else:
        trainer, model, hand = classify_setup(work, a.encoder)
        label = f"classify, {a.encoder} encoders"
    out = a.out or os.path.join(HERE, "results", f"loop_step_{a.task}" + ("" if a.task == "sft" else f"_{a.encoder}"))
    batches = [b for b in trainer.train_loader]

    trainer.model.train(), model.train()
    cfg = trainer.recipe.train

    def loop_without_logging(batch):
        # the same step with the every-10-steps row (metrics.jsonl + TensorBoard) switched off, which the
        # hand-written loop does not have: tells the loop's own cost from its logging
        every, cfg.logging_steps = cfg.logging_steps, 10 ** 9
        try:
            trainer.training_step(batch)
        finally:
            cfg.logging_steps = every

    variants = [("loop", trainer.training_step), ("loop_no_logging", loop_without_logging), ("hand", hand)]
    times = {name: [] for name, _ in variants}
    for r in range(a.rounds + 1):  # round 0 warms up all
        for name, step in variants[r % 3:] + variants[:r % 3]:  # rotating order
            tick = time.perf_counter()
            for i in range(a.steps):
                step(batches[i % len(batches)])
            if r:
                times[name].append((time.perf_counter() - tick) / a.steps)

    # collation of a later epoch: the loop's loader only pads / stacks what was prepared once
    trainer.train_loader.set_epoch(1)
    tick = time.perf_counter()
    n = sum(1 for _ in trainer.train_loader)
    collate = (time.perf_counter() - tick) / n
    loop, hand_t = statistics.median(times["loop"]), statistics.median(times["hand"])
    ratios = [x / y for x, y in zip(times["loop"], times["hand"])]
    quiet = [x / y for x, y in zip(times["loop_no_logging"], times["hand"])]
    res = {"task": a.task, "setting": label, "rounds": a.rounds, "steps_per_round": a.steps, "loop_step_s": loop,
           "hand_step_s": hand_t, "ratio": statistics.median(ratios), "ratios": ratios,
           "ratio_without_logging": statistics.median(quiet), "ratios_without_logging": quiet,
           "collate_per_batch_s": collate, "collate_fraction_of_step": collate / loop}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(res, fh, indent=2)
    md = ("| setting | loop step / hand-written step | the same without the loop's logging rows | later-epoch "
          "loading + collation / step |\n|---|---|---|---|\n"
          f"| {label} | {res['ratio']:.3f}x (median of {a.rounds} interleaved rounds; range "
          f"{min(ratios):.2f}-{max(ratios):.2f}) | {res['ratio_without_logging']:.3f}x (range "
          f"{min(quiet):.2f}-{max(quiet):.2f}) | {100 * res['collate_fraction_of_step']:.2f}% |\n")
    with open(out + ".md", "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
