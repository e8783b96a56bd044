"""Run logs on the main process: `metrics.jsonl` (one line per log or eval, always written) and the
experiment trackers of `train.report_to`, through Accelerate's trackers (`Accelerator(log_with=...)`,
`init_trackers`, `accelerator.log`).

`train.report_to` follows `transformers.TrainingArguments.report_to`: one name or a list of names,
"all" (every installed tracker) or "none". TensorBoard is Accelerate's own `TensorBoardTracker`, built
here so that its event files stay in `<output_dir>/tensorboard` (Accelerate would nest them under the
project name); the other trackers are built by Accelerate under the project name "mmbalance", with the
run named after the output folder. A resumed run purges the event steps after its checkpoint.
"""
from __future__ import annotations

import json
import os

# report_to name -> (package that must be importable, accelerate's availability check)
TRACKERS = {
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "wandb": ("wandb", "is_wandb_available"),
    "mlflow": ("mlflow", "is_mlflow_available"),
    "comet_ml": ("comet_ml", "is_comet_ml_available"),
    "clearml": ("clearml", "is_clearml_available"),
    "dvclive": ("dvclive", "is_dvclive_available"),
    "aim": ("aim", "is_aim_available"),
    "swanlab": ("swanlab", "is_swanlab_available"),
    "trackio": ("trackio", "is_trackio_available"),
}
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")
PROJECT_NAME = "mmbalance"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def _installed(name: str) -> bool:
    import accelerate.utils as au

    check = getattr(au, TRACKERS[name][1], None)
    return bool(check()) if check is not None else False


def resolve_report_to(value) -> list:
    """`train.report_to` -> the tracker names to start, in order. One-line RecipeError for an unknown name,
    "none" mixed with others, or a tracker whose package is not installed (before anything is written)."""
    from mmbalance_llm.config import RecipeError

    names = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    for n in names:
        if n not in REPORT_TO_CHOICES:
            raise RecipeError(f"recipe key 'train.report_to' is {n!r}; choose one of {', '.join(REPORT_TO_CHOICES)}")
    if "none" in names:
        if len(names) > 1:
            raise RecipeError("recipe key 'train.report_to': 'none' cannot be combined with other trackers")
        return []
    if "all" in names:
        return [n for n in TRACKERS if _installed(n)]
    out = []
    for n in names:
        if not _installed(n):
            raise RecipeError(f"train.report_to {n!r}: the package {TRACKERS[n][0]} is not installed "
                              f"(pip install {TRACKERS[n][0]}, or remove it from train.report_to)")
        if n not in out:
            out.append(n)
    return out


def log_with(names: list, output_dir: str, extra=()) -> list:
    """What `Accelerator(log_with=...)` gets: tracker names, TensorBoard as a tracker object writing to
    `<output_dir>/tensorboard`, and any `GeneralTracker` objects given through the Python API."""
    out = []
    for n in names:
        if n == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            out.append(TensorBoardTracker("tensorboard", output_dir))  # starts lazily, in init_trackers
        else:
            out.append(n)
    return out + list(extra)


def hparams(recipe_dict: dict, prefix: str = "") -> dict:
    """The recipe as one flat {dotted.key: bool | int | float | str} mapping (what trackers accept)."""
    out = {}
    for k, v in recipe_dict.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(hparams(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class RunLogger:
    """`metrics.jsonl` plus the Accelerator's trackers. `accelerator` may be None (no trackers)."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None = None, accelerator=None,
                 config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.accelerator = accelerator
        self.trackers_started = False
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
        if accelerator is not None and accelerator.log_with:
            from accelerate.tracking import TensorBoardTracker

            for tracker in accelerator.log_with:
                if isinstance(tracker, TensorBoardTracker) and resume_step is not None:
                    # TensorBoard hides the older event files' steps after the checkpoint (as metrics.jsonl drops them)
                    tracker.init_kwargs["purge_step"] = resume_step + 1
            name = os.path.basename(os.path.normpath(output_dir)) or PROJECT_NAME
            accelerator.init_trackers(PROJECT_NAME, config=config,
                                      init_kwargs={"wandb": {"name": name, "dir": output_dir},
                                                   "mlflow": {"run_name": name}})
            self.trackers_started = True

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.trackers_started:
            split = row.get("split", "train")
            values = {f"{split}/{k}": v for k, v in
                      flatten({k: v for k, v in row.items() if k not in ("step", "epoch", "split")}).items()}
            if values:
                self.accelerator.log(values, step=row.get("step", 0))

    def log_trackers(self, row: dict, step: int) -> None:
        """Values for the trackers only (e.g. the final test metrics, which metrics.jsonl does not hold)."""
        if self.enabled and self.trackers_started:
            self.accelerator.log(flatten(row), step=step)

    def close(self) -> None:
        """Finish the trackers (Accelerate's `end_training` minus its process-group teardown: the launched
        command leaves the group itself, and a Python caller may train again in the same process)."""
        if self.trackers_started:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self.trackers_started = False
