"""IMoD (Zhang et al., CVPR 2026): implicit modality decomposition of LoRA as a peft method.

Importing this package checks the peft version and registers "IMOD" with peft. Usage::

    import peft, mmbalance_llm
    from mmbalance_llm import ImodConfig
    pm = peft.get_peft_model(model, ImodConfig())      # targets + layer count + token ids from the modality map
    out = pm(**batch)                                    # training mode, with labels
    (out.loss + out.imod_loss).backward()                # or ImodConfig(add_to_model_loss=True): out.loss only
    pm.save_pretrained(d); peft.PeftModel.from_pretrained(base, d)   # adapter_config.json: "IMOD"
    pm.merge_and_unload()                                # the forward is LoRA's, so it merges
"""
from mmbalance_llm.adapters.moka.model import check_peft_version

check_peft_version()

from mmbalance_llm.adapters.imod.config import IMOD_ONLY_FIELDS, IMOD_PEFT_TYPE, ImodConfig  # noqa: E402
from mmbalance_llm.adapters.imod.layer import ImodLinear  # noqa: E402
from mmbalance_llm.adapters.imod.model import ImodMaskContext, ImodModel, load_imod, register_imod  # noqa: E402

register_imod()

__all__ = ["ImodConfig", "ImodModel", "ImodLinear", "ImodMaskContext", "IMOD_PEFT_TYPE", "IMOD_ONLY_FIELDS",
           "load_imod", "register_imod"]
