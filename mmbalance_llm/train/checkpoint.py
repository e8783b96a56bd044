"""Checkpoints: `checkpoint-N/` holds the Accelerate state (model, optimizer, scheduler, RNG; safetensors),
`trainer_state.json`, the balancer's state, and a copy of the best model so far, so a run resumed
anywhere continues exactly."""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from mmbalance_llm.train.io import write_json_atomic

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL, _TRASH = ".partial-", ".trash-"  # folders of a checkpoint being written / being replaced


def list_checkpoints(output_dir: str) -> list:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir)
             if (m := _CKPT.match(d)) and os.path.isfile(os.path.join(output_dir, d, "trainer_state.json"))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from, output_dir: str):
    if not resume_from:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise FileNotFoundError(f"train.resume_from_checkpoint is 'latest' but '{output_dir}' has no complete "
                                    "checkpoint-N folder")
        return ckpts[-1]
    if not os.path.isfile(os.path.join(resume_from, "trainer_state.json")):
        raise FileNotFoundError(f"train.resume_from_checkpoint '{resume_from}' is not a complete checkpoint folder "
                                "(no trainer_state.json)")
    return resume_from


def save_balancer_state(state: dict, folder: str) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        save_file(tensors, os.path.join(folder, "balancer_state.safetensors"))
    write_json_atomic(os.path.join(folder, "balancer_state.json"), rest)


def load_balancer_state(folder: str) -> dict:
    state = {}
    path = os.path.join(folder, "balancer_state.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            state.update(json.load(fh))
    path = os.path.join(folder, "balancer_state.safetensors")
    if os.path.isfile(path):
        # fresh allocations: a tensor backed by the file's buffer can be aligned differently from one the run
        # computed, and BLAS then takes another kernel (last-bit differences after a resume)
        state.update({k: v.clone() for k, v in load_file(path).items()})
    return state


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict, balancer_state: dict,
                    keep: int | None) -> str:
    """Write `checkpoint-{step}` into a partial folder and rename it into place only when complete, so a
    kill at any moment leaves either the previous complete checkpoint or the new one, never a torn one."""
    folder = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f"{_PARTIAL}checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial, safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's RNG file is in the partial folder
    if accelerator.is_main_process:
        save_balancer_state(balancer_state, partial)
        best = os.path.join(output_dir, "best")
        if os.path.isdir(best):
            shutil.copytree(best, os.path.join(partial, "best"), dirs_exist_ok=True)
        write_json_atomic(os.path.join(partial, "trainer_state.json"), trainer_state)
        if os.path.isdir(folder):  # the same step written again (e.g. a stop right after an epoch end)
            trash = os.path.join(output_dir, f"{_TRASH}checkpoint-{step}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(folder, trash)
            os.replace(partial, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, folder)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def remove_incomplete(output_dir: str) -> list:
    """Delete partial checkpoint folders left by a killed run (main process, at start)."""
    removed = []
    if os.path.isdir(output_dir):
        for d in os.listdir(output_dir):
            if d.startswith((_PARTIAL, _TRASH)):
                shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
                removed.append(d)
    return removed


def clear_run(output_dir: str) -> None:
    """A fresh run must not pick up an older run's checkpoints, best model, reports or event files."""
    for old in list_checkpoints(output_dir) + [os.path.join(output_dir, d) for d in ("best", "tensorboard")]:
        shutil.rmtree(old, ignore_errors=True)
    for name in ("final_metrics.json", "timing.json"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


class OutputLock:
    """An exclusive lock on `output_dir` for the duration of a run (released by the OS if the process dies)."""

    def __init__(self, output_dir: str):
        import fcntl

        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, ".mmbalance.lock")
        self.fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "unknown"
            self.fh.close()
            raise RuntimeError(f"output_dir '{output_dir}' is in use by another run (PID {holder}); "
                               "wait for it or choose another output_dir") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()

    def release(self) -> None:
        if self.fh is not None and not self.fh.closed:
            try:
                os.remove(self.path)
            except OSError:
                pass
            self.fh.close()


def lock_output_dir(output_dir: str) -> OutputLock:
    return OutputLock(output_dir)


def check_checkpoint(folder: str, process_index: int) -> None:
    """Refuse, in one line, a checkpoint whose files this process would read are missing or unreadable
    (Accelerate skips a bad RNG file silently, and the resumed run would then differ from the original)."""
    rng = os.path.join(folder, f"random_states_{process_index}.pkl")
    if not os.path.isfile(rng):
        raise RuntimeError(f"checkpoint '{folder}' has no RNG state for process {process_index} ({os.path.basename(rng)}); "
                           "it was written by another number of processes or is incomplete")
    try:
        torch.load(rng, weights_only=False)  # the project's own file, written by Accelerate's save_state
    except Exception as exc:
        raise RuntimeError(f"checkpoint file '{rng}' is corrupt ({type(exc).__name__}); resume from another "
                           "checkpoint") from None
    try:
        load_trainer_state(folder)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"checkpoint file '{os.path.join(folder, 'trainer_state.json')}' is corrupt ({exc})") from None


def load_trainer_state(folder: str) -> dict:
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)


def restore_best(folder: str, output_dir: str, is_main: bool) -> None:
    """Put the checkpoint's copy of the best model back as `output_dir/best`."""
    src = os.path.join(folder, "best")
    dst = os.path.join(output_dir, "best")
    if not is_main or os.path.abspath(src) == os.path.abspath(dst):
        return
    # A best/ written after this checkpoint (by the interrupted run) must not survive the resume.
    shutil.rmtree(dst, ignore_errors=True)
    if os.path.isdir(src):
        shutil.copytree(src, dst)
