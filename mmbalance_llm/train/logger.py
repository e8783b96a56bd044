"""Run logs on the main process: `metrics.jsonl` (one line per log or eval) and TensorBoard scalars."""
from __future__ import annotations

import json
import os


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


class RunLogger:
    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(self.path):
            # Drop lines written after the checkpoint we resume from, so the log has no duplicates.
            with open(self.path, encoding="utf-8") as fh:
                kept = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
        elif resume_step is None and os.path.isfile(self.path):
            os.remove(self.path)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        split = row.get("split", "train")
        for key, value in flatten({k: v for k, v in row.items() if k not in ("step", "epoch", "split")}).items():
            self.writer.add_scalar(f"{split}/{key}", value, row.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
