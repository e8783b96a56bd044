"""Thread-count choice and the quiet console."""
import os
import subprocess
import sys

import pytest
import torch

from mmbalance_llm.config import TrainConfig, load_recipe
from mmbalance_llm.utils.threads import DEFAULT_THREADS, configure_threads, default_num_threads


def test_default_threads_follow_the_environment_and_the_local_world_size():
    assert default_num_threads({}) == DEFAULT_THREADS
    assert default_num_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert default_num_threads({"OMP_NUM_THREADS": "junk"}) == DEFAULT_THREADS
    assert default_num_threads({"LOCAL_WORLD_SIZE": "64"}) == 1  # divided among processes, never below 1


def test_configure_threads_sets_torch_and_rejects_bad_values():
    before = torch.get_num_threads()
    try:
        assert configure_threads(2) == 2 and torch.get_num_threads() == 2
        assert configure_threads(None) == default_num_threads() == torch.get_num_threads()
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="train.num_threads"):
                configure_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_num_threads_is_a_recipe_field():
    assert TrainConfig().num_threads is None
    assert load_recipe({}, ["train.num_threads=2"]).train.num_threads == 2


def test_quiet_dependencies_hides_dependency_noise_but_not_ours():
    env = dict(os.environ)
    code = ("import logging, warnings, sys\n"
            "from mmbalance_llm.utils.console import quiet_dependencies\n"
            "quiet_dependencies(len(sys.argv) > 1)\n"
            "warnings.warn('future', FutureWarning)\n"
            "warnings.warn_explicit('dep', UserWarning, 'x.py', 1, module='transformers.modeling_utils')\n"
            "warnings.warn('ours', UserWarning)\n"
            "logging.getLogger('DeepSpeed').addHandler(logging.StreamHandler())\n"
            "logging.getLogger('DeepSpeed').warning('Setting accelerator to CPU')\n"
            "import os; print(os.environ.get('TRANSFORMERS_VERBOSITY'))\n")
    env.pop("TRANSFORMERS_VERBOSITY", None)
    env.pop("PYTHONWARNINGS", None)
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "ours" in quiet.stderr and "future" not in quiet.stderr and "dep" not in quiet.stderr
    assert "Setting accelerator" not in quiet.stderr and quiet.stdout.strip() == "error"
    loud = subprocess.run([sys.executable, "-c", code, "verbose"], capture_output=True, text=True, env=env)
    assert "future" in loud.stderr and "Setting accelerator" in loud.stderr and loud.stdout.strip() == "None"


def test_quiet_dependencies_keeps_the_users_environment():
    # in a child process: the quiet settings are process-wide and must not leak into other tests
    code = ("import logging, os\n"
            "from mmbalance_llm.utils.console import quiet_dependencies\n"
            "quiet_dependencies(False)\n"
            "print(os.environ['TRANSFORMERS_VERBOSITY'], os.environ['HF_DATASETS_DISABLE_PROGRESS_BARS'])\n"
            "quiet_dependencies(True)\n"
            "print(len(logging.getLogger('DeepSpeed').filters))\n")
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="info")
    env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["info", "1", "0"], out.stderr


def test_report_details_is_a_table():
    from mmbalance_llm.eval.report_html import details_table

    out = details_table({"shapley_phi_mean": {"image": 0.25, "text": 0.123456789},
                         "delta_logp_blank_mean": {"image": -1.5}, "steps": 40, "note": "<b>x</b>"})
    assert out.startswith("<table>") and "<pre>" not in out and "{" not in out
    assert "<th>image</th><th>text</th><th>value</th>" in out and "<td>0.1235</td>" in out
    assert "mean modality Shapley value" in out and "&lt;b&gt;x&lt;/b&gt;" in out and "<td>40</td>" in out
