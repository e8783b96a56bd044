"""``MmbalanceLlava``: lmms-eval's ``llava_hf`` model with an adapter trained here added on top."""
from __future__ import annotations

import json
from pathlib import Path

from lmms_eval.models.simple.llava_hf import LlavaHf


def resolve_base_and_adapter(pretrained: str, adapter: str | None = None, base: str | None = None):
    """(base model path, adapter folder or None): ``pretrained`` may be an adapter folder that names its base."""
    cfg = Path(pretrained) / "adapter_config.json"
    if adapter is None and cfg.is_file() and not (Path(pretrained) / "config.json").is_file():
        adapter = pretrained
        recorded = json.loads(cfg.read_text()).get("base_model_name_or_path")
        pretrained = base or recorded
        if not pretrained:
            raise ValueError(f"{cfg}: no base_model_name_or_path; pass base=PATH in --model_args")
    elif base:
        pretrained = base
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"mmbalance_llava: adapter={adapter!r} has no adapter_config.json")
    return pretrained, adapter


class MmbalanceLlava(LlavaHf):
    """``llava_hf`` on the base, plus a MokA / LoRA adapter via ``load_adapter`` (MokA is registered with peft on
    import of ``mmbalance_llm``). ``device_map`` defaults to ``device`` (lmms-eval's empty default is refused by
    transformers 5)."""

    def __init__(self, pretrained: str = "", adapter: str | None = None, base: str | None = None,
                 device: str = "cuda", device_map: str = "", **kwargs) -> None:
        import mmbalance_llm  # noqa: F401  (registers "MOKA" with peft)

        base_path, adapter = resolve_base_and_adapter(pretrained, adapter, base)
        super().__init__(pretrained=base_path, device=device, device_map=device_map or device, **kwargs)
        self.adapter = adapter
        if adapter is not None:
            model = getattr(self._model, "module", self._model)  # lmms-eval may have wrapped it for data parallel
            model.load_adapter(adapter)
            model.eval()
