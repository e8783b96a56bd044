"""MokA (Wei et al., NeurIPS 2025): multimodal low-rank adaptation as a peft method.

Importing this package checks the peft version and registers "MOKA" with peft. Usage::

    import peft, mmbalance_llm
    from mmbalance_llm import MokaConfig
    pm = peft.get_peft_model(model, MokaConfig())      # targets + modalities from the modality map
    pm.save_pretrained(d); peft.PeftModel.from_pretrained(base, d)   # adapter_config.json: "MOKA"
"""
from mmbalance_llm.adapters.moka.model import check_peft_version, load_moka, register_moka

check_peft_version()

from mmbalance_llm.adapters.moka.config import MOKA_PEFT_TYPE, MokaConfig  # noqa: E402
from mmbalance_llm.adapters.moka.layer import MokaLinear  # noqa: E402
from mmbalance_llm.adapters.moka.masks import MokaMaskContext  # noqa: E402
from mmbalance_llm.adapters.moka.model import MokaModel  # noqa: E402
from mmbalance_llm.adapters.moka.template import answer_marker_ids  # noqa: E402

register_moka()

__all__ = ["MokaConfig", "MokaModel", "MokaLinear", "MokaMaskContext", "MOKA_PEFT_TYPE", "load_moka",
           "register_moka", "check_peft_version", "answer_marker_ids"]
