"""MokA's registration with peft must survive a bare find_spec('peft') made before peft is imported
(transformers' is_peft_available does exactly that), and must not import torch eagerly."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import importlib.util, sys
import mmbalance_llm
assert "torch" not in sys.modules, "import mmbalance_llm imported torch"
importlib.util.find_spec("peft"); importlib.util.find_spec("peft")
from transformers.utils import is_peft_available
assert is_peft_available()
import peft.mapping
assert "MOKA" in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "MokA not registered"
print("ok")
"""


def test_registration_survives_find_spec_before_import():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
