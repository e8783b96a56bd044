"""Adapters: MokA and IMoD as peft methods (``mmbalance_llm.adapters.moka``, ``mmbalance_llm.adapters.imod``).

``import mmbalance_llm`` must make ``PeftModel.from_pretrained`` understand "MOKA" without importing torch
eagerly. :func:`install_peft_registration` does that: if peft is already imported MokA registers now, else a
post-import hook registers it right after the first ``import peft`` finishes (before any user code can
call ``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    import mmbalance_llm.adapters.moka  # noqa: F401  (registers on import)
    import mmbalance_llm.adapters.imod  # noqa: F401


class _PeftPostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level ``peft`` package so MokA registers when peft has finished importing.

    It stays installed until peft is really executed: a bare ``importlib.util.find_spec("peft")`` (as
    transformers' ``is_peft_available`` does) must not use it up."""

    _busy = False  # the inner find_spec below walks sys.meta_path again

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        finder = self

        def exec_and_register(module):
            exec_module(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            try:
                _register()
            except ImportError as e:  # wrong peft version: say so once, do not break plain peft use
                import warnings

                warnings.warn(str(e), stacklevel=2)

        spec.loader.exec_module = exec_and_register
        return spec


def install_peft_registration() -> None:
    """Register MokA with peft now (peft already imported) or right after peft gets imported."""
    if "peft" in sys.modules:
        try:
            _register()
        except ImportError as e:
            import warnings

            warnings.warn(str(e), stacklevel=2)
        return
    if not any(isinstance(f, _PeftPostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftPostImportFinder())
