"""The number of CPU threads torch uses, chosen on purpose (`train.num_threads`).

torch's default is one intra-op thread per physical core. For the small models this toolkit trains on
CPU that buys little on an idle machine and collapses as soon as anything else runs: OpenMP threads
wait for each other at every op, and a busy core stalls them all (benchmarks/threads.py, docs/speed.md:
tens of times slower per step with two busy processes on a 2-core machine, against a few percent
gained when idle). So the default is `DEFAULT_THREADS` for the whole machine's share of one job,
divided among the processes a launcher started on this node (LOCAL_WORLD_SIZE), and never below 1.
An explicit `OMP_NUM_THREADS` in the environment is the user's choice and wins over the default.
"""
from __future__ import annotations

import os
from typing import Optional

DEFAULT_THREADS = 1  # per job; see the module docstring and docs/speed.md for the measurement


def default_num_threads(environ=None) -> int:
    """The thread count `configure_threads(None)` picks for this process."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("OMP_NUM_THREADS", "").strip()
    if explicit:
        try:
            return max(1, int(explicit))
        except ValueError:
            pass  # an unparsable value: fall back to the default, as torch itself does
    try:
        local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, DEFAULT_THREADS // local)


def configure_threads(num_threads: Optional[int]) -> int:
    """Set torch's intra-op thread count for this process and return it.

    `num_threads`: a positive count (per process), or None for `default_num_threads()`. Raises a
    one-line ValueError naming `train.num_threads` for anything else."""
    if num_threads is None:
        n = default_num_threads()
    elif isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"train.num_threads must be a positive integer or null, got {num_threads!r}")
    else:
        n = num_threads
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
