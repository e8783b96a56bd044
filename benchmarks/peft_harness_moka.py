"""Run peft's own generic test harness (``tests/testing_common.py`` of the peft sdist) against ``MokaConfig``.

The harness is not shipped in the peft wheel, so this script reads it from the sdist of the pinned version::

    pip download --no-binary :all: --no-deps peft==0.21.2 -d /tmp/peft_sdist
    PYTHONPATH=$PWD python benchmarks/peft_harness_moka.py /tmp/peft_sdist/peft-0.21.2.tar.gz

Every ``PeftCommonTester._test_*`` check runs once per argument variant that peft's own decoder-model suite uses
(``tests/test_decoder_models.py``), with the same LoRA-style kwargs (task CAUSAL_LM, r 8, alpha 32, dropout 0.05,
and ``init_lora_weights=False`` exactly where that suite calls ``set_init_weights_false``),
on a tiny random-weight LLaVA saved to disk (real ``LlavaForConditionalGeneration``, loaded by path, no hub) and an
input batch with image tokens and a question. Outcomes:

* ``pass``; ``skip`` (the harness itself skips the check for this method or setting);
* ``refused``: the check needs something MokA refuses by design and the refusal is MokA's one-line message
  (merging, weighted combination; conversion to LoRA, where the check returns early on
  ``supports_lora_conversion() == False``);
* ``fail``: anything else (printed with its error).

Writes a markdown table to ``benchmarks/results/peft_harness_moka.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import tarfile
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# MokA's own refusals, by message: a check that fails on one of these is "refused" (by design), not "fail"
REFUSALS = ("cannot be merged", "mixed-adapter batches", "cannot be combined with add_weighted_adapter",
            "do not support LoRA conversion", "not supported for mixed models")
# argument variants peft's decoder-model suite passes (test_decoder_models.py)
VARIANTS = {
    "_test_save_pretrained": [{"safe_serialization": True}, {"safe_serialization": False}],
    "_test_save_pretrained_selected_adapters": [{"safe_serialization": True}, {"safe_serialization": False}],
    "_test_add_adapter_no_autocast_adapter_dtype": [{"dtype": "float16"}, {"dtype": "bfloat16"}],
    "_test_generate_pos_args": [{"raises_err": False}],
    "_test_training_gradient_checkpointing": [{"use_reentrant": True}, {"use_reentrant": False}],
}
HELPERS = {"_test_weighted_combination_of_adapters_lora", "_test_weighted_combination_of_adapters_ia3"}
CONFIG_KWARGS = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05,
                 "bias": "none"}


def harness_dir(src: str) -> Path:
    """The sdist's ``tests`` folder, from an extracted sdist folder or the ``.tar.gz``."""
    p = Path(src)
    if p.is_file():
        out = Path(tempfile.mkdtemp(prefix="peft_sdist_"))
        with tarfile.open(p) as t:
            t.extractall(out, filter="data")
        p = next(out.iterdir())
    tests = p / "tests" if (p / "tests").is_dir() else p
    if not (tests / "testing_common.py").is_file():
        raise SystemExit(f"peft_harness_moka: no tests/testing_common.py under {src}")
    return tests


def init_false_checks(tests: Path) -> set[str]:
    """Checks that peft's decoder suite runs with ``set_init_weights_false`` (an adapter that is not the identity
    at init), read from the sdist's ``test_decoder_models.py`` so the kwargs follow peft's own choice."""
    import re

    src = (tests / "test_decoder_models.py").read_text()
    out, called = set(), set()
    for block in re.split(r"\n    def test_", src)[1:]:
        names = re.findall(r"self\.(_test_\w+)\(", block)
        called.update(names)
        if "set_init_weights_false" in block:
            out.update(names)
    # checks the decoder suite does not call (custom-model ones such as _test_safe_merge) all need a non-identity init
    return out | {n for n in dir_checks(tests) if n not in called}


def dir_checks(tests: Path) -> set[str]:
    import re

    return set(re.findall(r"\n    def (_test_\w+)\(", (tests / "testing_common.py").read_text()))


def import_harness(tests: Path):
    """Import ``testing_common`` as a sub-module of a synthetic package (it uses relative imports)."""
    if "diffusers" not in sys.modules:  # imported at module level for the stable-diffusion checks only
        try:
            import diffusers  # noqa: F401
        except ImportError:
            stub = types.ModuleType("diffusers")
            stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # matches no model
            sys.modules["diffusers"] = stub
    pkg = types.ModuleType("peft_sdist_tests")
    pkg.__path__ = [str(tests)]
    sys.modules["peft_sdist_tests"] = pkg
    return importlib.import_module("peft_sdist_tests.testing_common")


def make_fixture(work: Path):
    """(model dir, inputs without labels) for a tiny LLaVA with an image + question batch."""
    import torch
    from transformers import AutoProcessor

    from mmbalance_llm.data.chat import ChatCollator, load_conversations
    from mmbalance_llm.data.mm_synthetic import write_instruction_set
    from mmbalance_llm.models.tiny import build_tiny

    model_dir = build_tiny("llava", work / "tiny_llava")
    write_instruction_set(work / "data", ("image",), 6, 2, 2, seed=1)
    proc = AutoProcessor.from_pretrained(model_dir)
    from transformers import AutoConfig

    recs = load_conversations(work / "data" / "train.json")
    batch = ChatCollator(proc, AutoConfig.from_pretrained(model_dir))([recs[0], recs[1]])
    batch.pop("labels")
    return str(model_dir), {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def run(tests: Path, only: str | None = None) -> list[dict]:
    import pytest
    import torch
    from transformers import LlavaForConditionalGeneration

    import mmbalance_llm  # noqa: F401  (registers MokA)
    from mmbalance_llm import MokaConfig

    tc = import_harness(tests)
    work = Path(tempfile.mkdtemp(prefix="moka_harness_"))
    model_id, inputs = make_fixture(work)

    class MokaTester(tc.PeftCommonTester):
        transformers_class = LlavaForConditionalGeneration
        torch_device = "cpu"

        def prepare_inputs_for_testing(self):
            return {k: v.clone() for k, v in inputs.items()}

    tester = MokaTester()
    init_false = init_false_checks(tests)
    rows = []
    names = sorted(n for n in dir(tc.PeftCommonTester) if n.startswith("_test_") and n not in HELPERS)
    for name in names:
        if only and only not in name:
            continue
        fn = getattr(tester, name)
        params = list(inspect.signature(fn).parameters)
        for extra in VARIANTS.get(name, [{}]):
            kw = {k: (getattr(torch, v) if k == "dtype" else v) for k, v in extra.items()}
            cfg_kwargs = dict(CONFIG_KWARGS, **({"init_lora_weights": False} if name in init_false else {}))
            args = ([""] if params[0] == "test_name" else []) + [model_id, MokaConfig, cfg_kwargs]
            label = name + ("" if not extra else "[" + ",".join(f"{k}={v}" for k, v in extra.items()) + "]")
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn(*args, **kw)
                outcome, why = "pass", ""
                if name == "_test_lora_conversion":  # the check returns early for a method that cannot convert
                    outcome, why = "refused", "supports_lora_conversion() is False, so the check returns early"
            except pytest.skip.Exception as e:
                outcome, why = "skip", str(e).splitlines()[0][:120]
            except BaseException as e:  # noqa: BLE001  (the harness asserts; report every failure)
                msg = f"{type(e).__name__}: {e}".splitlines()[0]
                outcome = "refused" if any(r in msg for r in REFUSALS) else "fail"
                why = msg[:160]
                if outcome == "fail":
                    traceback.print_exc(limit=-3)
            rows.append({"check": label, "outcome": outcome, "why": why, "s": time.perf_counter() - t0})
            print(f"{outcome:8s} {label} {why}", flush=True)
    return rows


def write_table(rows: list[dict], out: Path, peft_version: str, seconds: float) -> str:
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("pass", "refused", "skip", "fail")}
    applicable = counts["pass"] + counts["fail"]
    lines = [f"peft {peft_version} generic harness (`tests/testing_common.py`, `PeftCommonTester`) with `MokaConfig` "
             f"on a tiny LLaVA (`python benchmarks/peft_harness_moka.py SDIST`, {seconds:.0f} s on CPU).", "",
             f"**{counts['pass']} of {applicable} applicable checks pass**; {counts['refused']} refused by design "
             f"(MokA's one-line refusal), {counts['skip']} skipped by the harness itself, {counts['fail']} failing.",
             "", "| check | outcome | note |", "|---|---|---|"]
    lines += [f"| `{r['check']}` | {r['outcome']} | {r['why'].replace('|', '/')} |" for r in rows]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sdist", help="peft sdist .tar.gz, or its extracted folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peft_harness_moka.md"))
    ap.add_argument("-k", dest="only", default=None, help="run only checks whose name contains this")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft

    t0 = time.perf_counter()
    rows = run(harness_dir(a.sdist), a.only)
    print(write_table(rows, Path(a.out), peft.__version__, time.perf_counter() - t0))
    return 1 if any(r["outcome"] == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
