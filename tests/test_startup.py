"""Start-up hygiene: the CLI parses arguments before torch loads; `methods` needs no model classes."""
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_and_version_do_not_import_torch():
    out = _run("import sys\n"
               "from mmbalance_llm.cli import main\n"
               "for argv in (['--help'], ['--version'], ['make-data', '--help']):\n"
               "    try:\n"
               "        main(argv)\n"
               "    except SystemExit:\n"
               "        pass\n"
               "print('TORCH', 'torch' in sys.modules)\n")
    assert "TORCH False" in out
    assert "mmbalance 0.1.0" in out
    from mmbalance_llm.data.synthetic import PRESETS

    assert "tokens_starve" in PRESETS
    help_text = " ".join(out.split())  # argparse wraps the preset list
    assert all(p in help_text for p in PRESETS)


def test_methods_lists_every_method():
    # `import mmbalance_llm.models` registers every architecture with AutoModel (so it imports transformers'
    # modeling code), and two balancer modules import from that package: `methods` pays for it.
    out = _run("from mmbalance_llm.cli import main\n"
               "main(['methods'])\n")
    assert "mmpareto" in out and "ogm_ge" in out


def test_package_names_stay_importable_lazily():
    out = _run("import sys, mmbalance_llm\n"
               "print('TORCH', 'torch' in sys.modules)\n"
               "from mmbalance_llm import load_recipe\n"  # MokaConfig etc.: tests/test_moka.py imports them
               "from mmbalance_llm.models import MultimodalOutput\n"
               "from mmbalance_llm.data.features import DataError\n"
               "from mmbalance_llm.data.errors import DataError as E2\n"
               "print('SAME', DataError is E2)\n")
    assert "TORCH False" in out and "SAME True" in out
    with pytest.raises(AttributeError):
        import mmbalance_llm.models as models

        models.NoSuchThing  # noqa: B018


def test_verbose_is_accepted_anywhere_and_stripped():
    out = _run("import sys, warnings\n"
               "from mmbalance_llm import cli\n"
               "seen = []\n"
               "import mmbalance_llm.utils.console as console\n"
               "console.quiet_dependencies = lambda verbose: seen.append(verbose)\n"
               "for argv in (['--version'], ['--verbose', '--version'], ['--version', '--verbose']):\n"
               "    try:\n"
               "        cli.main(argv)\n"
               "    except SystemExit:\n"
               "        pass\n"
               "print('SEEN', seen)\n")
    assert "SEEN [False, True, True]" in out
