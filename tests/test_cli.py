"""The `mmbalance` command end to end: make-data, train, eval, compare, methods, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from mmbalance_llm.cli import main
from mmbalance_llm.compare import run_compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "mmbalance_llm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_make_data_train_and_eval_from_the_command_line(tmp_path):
    data = tmp_path / "data"
    proc = cli("make-data", "synthetic", str(data), "--preset", "av_imbalance", "--train-size", "200",
               "--validation-size", "100", "--test-size", "100", "--num-classes", "4")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((data / "card.json").read_text())["train_size"] == 200
    out = tmp_path / "run"
    proc = cli("train", "recipes/synthetic/ogm_ge.yaml", f"data.path={data}", f"output_dir={out}",
               "train.epochs=2", "train.progress=false", "model.hidden_dim=32")
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    resolved = (out / "config.yaml").read_text()
    assert "hidden_dim: 32" in resolved and "method: ogm_ge" in resolved
    proc = cli("eval", str(out / "best"), "--data", str(data), "--split", "test", "--out", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["accuracy"] == pytest.approx(final["test"]["accuracy"])
    assert again["unimodal_accuracy"] == pytest.approx(final["test"]["unimodal_accuracy"])


@pytest.mark.parametrize("args, message", [
    (["train", "recipes/synthetic/baseline.yaml", "train.epochz=3"], "did you mean 'epochs'?"),
    (["train", "recipes/synthetic/baseline.yaml", "data.path=/nonexistent/data"], "data.path '/nonexistent/data' does not exist"),
    (["train", "recipes/synthetic/ogm_ge.yaml", "balance.alpah=1"], "did you mean 'alpha'?"),
    (["train", "no/such/recipe.yaml"], "recipe file 'no/such/recipe.yaml' does not exist"),
])
def test_errors_are_one_line_without_traceback(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_methods_lists_every_registered_method(capsys):
    from mmbalance_llm.balance import available_methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in available_methods():
        assert name in out
    assert "alpha = 0.8" in out


def test_compare_writes_table_curves_and_pareto(tiny_data, tmp_path):
    summary = run_compare(str(tmp_path / "cmp"), methods=["none", "unimodal_aux"], seeds=[0, 1],
                          data_path=tiny_data(), overrides=["train.epochs=1", "model.hidden_dim=32"], echo=lambda *_: None)
    for name in ("compare.md", "compare.json", "curves.png", "pareto.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0, name
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| none |" in table and "| unimodal_aux |" in table and "trained alone" in table and "±" in table
    assert summary["rows"]["none"]["seeds"] == 2
    assert set(summary["alone"]) == {"audio", "visual"}


def test_make_data_delegates_mm_instruct_and_tiny_models(tmp_path, capsys):
    assert main(["make-data", "mm-instruct", str(tmp_path / "mm"), "--n-train", "4", "--n-validation", "2",
                 "--n-test", "2", "--modalities", "image,audio"]) == 0
    train = json.loads((tmp_path / "mm" / "train.json").read_text())
    assert len(train) == 4 and all("messages" in r for r in train)
    assert main(["make-data", "tiny-model", "llava", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "config.json").exists()
