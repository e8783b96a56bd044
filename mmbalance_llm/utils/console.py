"""A quiet console by default: the dependencies' warnings, banners and progress bars only with --verbose.

What is silenced, and how (each survives the dependency being imported later, and reaches the worker
processes that `accelerate launch` starts, because environment variables are inherited):

- FutureWarning / DeprecationWarning from anywhere, and UserWarning raised inside torch, transformers,
  accelerate, datasets, peft, deepspeed or huggingface_hub (our own warnings stay visible);
- transformers / datasets logging below ERROR (`TRANSFORMERS_VERBOSITY`, `DATASETS_VERBOSITY`) and
  transformers' advisory warnings;
- the hub's and datasets' progress bars (`HF_HUB_DISABLE_PROGRESS_BARS`, `HF_DATASETS_DISABLE_PROGRESS_BARS`);
- DeepSpeed's start-up banner ("Setting accelerator to ...", logged as a WARNING on its "DeepSpeed"
  logger): a filter on that logger drops records below ERROR;
- torch's C++ warnings (`TORCH_CPP_LOG_LEVEL=ERROR`).

Environment variables are only set when the user has not set them, so an explicit choice wins.
"""
from __future__ import annotations

import logging
import os
import warnings

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
DEPENDENCIES = ("torch", "transformers", "accelerate", "datasets", "peft", "deepspeed", "huggingface_hub", "evaluate")
# Python-level warning filters for child processes (same as the in-process ones below).
PYTHONWARNINGS = "ignore::FutureWarning,ignore::DeprecationWarning"
NOISY_LOGGERS = ("DeepSpeed",)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_FILTER = _BelowError()


def quiet_dependencies(verbose: bool) -> None:
    """Hide the dependencies' warnings, banners and progress bars unless `verbose`.

    Call it once, early (the CLI does, before parsing); calling it again with the same value is harmless.
    With `verbose=True` it only removes what an earlier quiet call installed in this process."""
    if verbose:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(_FILTER)
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "PYTHONWARNINGS" not in os.environ:
        os.environ["PYTHONWARNINGS"] = PYTHONWARNINGS
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    pattern = r"(" + "|".join(DEPENDENCIES) + r")(\.|$)"
    warnings.filterwarnings("ignore", category=UserWarning, module=pattern)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    # Libraries already imported read their environment variables at import time: tell them directly.
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
