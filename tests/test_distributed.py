"""Real multi-process launches on CPU: 2-process DDP keeps every method's replicas identical, the CLI
runs under `accelerate launch -m mmbalance_llm`, the silent single-process pitfall is refused, and
DeepSpeed ZeRO-2 trains through the same trainer."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmbalance_llm.balance import available_methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def launch(args, env_extra=None, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               **(env_extra or {}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_two_processes_keep_every_methods_replicas_identical(tiny_data, tmp_path):
    from mmbalance_llm.balance import method_class

    # the classifier methods; the sft-only ones (mllm_*) under 2 processes: tests/test_mllm_balance.py
    methods = [m for m in available_methods() if "classify" in method_class(m).tasks]
    report = tmp_path / "report.json"
    proc = launch(["--config_file", "accelerate_configs/ddp_cpu_2proc.yaml", "tests/ddp_worker.py", tiny_data(),
                   str(tmp_path / "runs"), str(report), ",".join(methods)], {"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    failures = {m: r["error"] + "\n" + r["trace"] for m, r in result.items() if "error" in r}
    assert not failures, failures
    for method, r in result.items():
        assert r["world_size"] == 2 and r["distributed_type"] == "MULTI_CPU" and r["final_world_size"] == 2, method
        assert r["max_param_diff"] == 0.0, f"{method}: ranks diverged by {r['max_param_diff']}"


def test_cli_under_accelerate_launch_and_the_single_process_pitfall(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    args = ["--config_file", "accelerate_configs/ddp_cpu_2proc.yaml", "-m", "mmbalance_llm", "train",
            "recipes/synthetic/ogm_ge.yaml", f"data.path={tiny_data()}", f"output_dir={out}", "train.epochs=1",
            "train.progress=false"]
    proc = launch(args, {"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["distributed_type"] == "MULTI_CPU"
    # Without ACCELERATE_USE_CPU the launcher starts 2 processes that would each train alone: refused.
    bad_out = tmp_path / "bad"
    args[args.index(f"output_dir={out}")] = f"output_dir={bad_out}"
    proc = launch(args, {"ACCELERATE_USE_CPU": "false"})
    assert proc.returncode != 0
    assert "each would train alone" in proc.stderr
    assert not bad_out.exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
def test_deepspeed_zero2_on_cpu(tiny_data, tmp_path):
    out = tmp_path / "ds"
    proc = launch(["--config_file", "accelerate_configs/deepspeed_zero2.yaml", "-m", "mmbalance_llm", "train",
                   "recipes/synthetic/unimodal_aux.yaml", f"data.path={tiny_data()}", f"output_dir={out}",
                   "train.epochs=1", "train.progress=false"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["distributed_type"] == "DEEPSPEED"


def test_compare_under_two_processes_writes_one_report(tiny_data, tmp_path):
    out = tmp_path / "cmp"
    proc = launch(["--config_file", "accelerate_configs/ddp_cpu_2proc.yaml", "-m", "mmbalance_llm", "compare",
                   "--data", tiny_data(), "--output-dir", str(out), "--methods", "none,mmpareto", "--no-alone",
                   "train.epochs=1", "train.progress=false"], {"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "compare.json").read_text())
    assert summary["world_size"] == 2 and set(summary["rows"]) == {"none", "mmpareto"}
    assert proc.stdout.count("| mmpareto |") == 1  # one report, from the main process
    for run in ("none-seed0", "mmpareto-seed0"):
        final = json.loads((out / "runs" / run / "final_metrics.json").read_text())
        assert final["world_size"] == 2 and final["distributed_type"] == "MULTI_CPU"
