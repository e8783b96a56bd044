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
            raise FileNotFoundError(f"train.resume_from is 'latest' but '{output_dir}' has no checkpoint-N folder")
        return ckpts[-1]
    if not os.path.isfile(os.path.join(resume_from, "trainer_state.json")):
        raise FileNotFoundError(f"train.resume_from '{resume_from}' is not a checkpoint folder (no trainer_state.json)")
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
        state.update(load_file(path))
    return state


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict, balancer_state: dict,
                    keep: int | None) -> str:
    folder = os.path.join(output_dir, f"checkpoint-{step}")
    accelerator.save_state(folder, safe_serialization=True)
    if accelerator.is_main_process:
        save_balancer_state(balancer_state, folder)
        best = os.path.join(output_dir, "best")
        if os.path.isdir(best):
            shutil.copytree(best, os.path.join(folder, "best"), dirs_exist_ok=True)
        # Written last: a folder without it is an interrupted save and is ignored by 'latest'.
        write_json_atomic(os.path.join(folder, "trainer_state.json"), trainer_state)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


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
