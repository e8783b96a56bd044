"""``ImodConfig``: the peft config of IMoD (Zhang et al., CVPR 2026, "Parameter-Efficient Adaptation for MLLMs via
Implicit Modality Decomposition")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig

from mmbalance_llm.adapters.moka.config import MokaPeftType

IMOD_PEFT_TYPE = MokaPeftType("IMOD")  # a str that also answers like a peft.PeftType member (see MokaPeftType)


@dataclass
class ImodConfig(LoraConfig):
    """Configuration of an IMoD adapter: a plain LoRA (``y = W0 x + (alpha/r) B A x``, mergeable) whose ``A`` is
    partitioned element-wise into text-exclusive, non-text-exclusive and shared elements, trained with two extra
    gradients on ``A`` only::

        G_A = grad_A L_task + decouple_weight * grad_A (L_TS + L_OS) + align_weight * grad_A L_MA

    (see :mod:`mmbalance_llm.adapters.imod.constraints`). The shared share grows with depth:
    ``r_s(l) = shared_ratio + shared_ratio_growth * l / num_layers``; ``text_ratio`` of the remaining elements are
    text-exclusive, the others non-text-exclusive (all non-text modalities together).

    Paper defaults: decouple_weight (lambda_1) 1, align_weight (lambda_2) 1e-4, shared_ratio_growth (alpha) 0.4.
    Not given by the paper (ours): shared_ratio 1/3 (the equal three-way split the layer-wise scheme is compared
    with), text_ratio 0.5, and r=8 / alpha=16 / dropout 0.05. ``decouple_weight = align_weight = 0`` is plain
    LoRA, bit for bit.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of the single A/B pair (not reported by the paper; 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "Scaling numerator: the adapter output is multiplied by lora_alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input before A (the constraints read the input before dropout)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules to adapt. None: the language model's q/k/v/o/gate/up/down projections only, "
                          "from the modality map."},
    )
    decouple_weight: float = field(
        default=1.0, metadata={"help": "lambda_1: weight of the Modality-Specific Decoupling Constraint's gradient "
                                       "(paper: 1). 0 turns MSDC off."})
    align_weight: float = field(
        default=1e-4, metadata={"help": "lambda_2: weight of the Modality-Agnostic Alignment Constraint's gradient "
                                        "(paper: 1e-4). 0 turns MAAC off."})
    shared_ratio: float = field(
        default=1 / 3, metadata={"help": "r_s^(0): share of A's elements that are shared in the first layer "
                                         "(not given by the paper; 1/3 = the equal split)."})
    shared_ratio_growth: float = field(
        default=0.4, metadata={"help": "alpha: the shared share grows by alpha * l / L with depth (paper: 0.4); "
                                       "shared_ratio + shared_ratio_growth must be <= 1."})
    text_ratio: float = field(
        default=0.5, metadata={"help": "Fraction of the non-shared elements that are text-exclusive (the rest are "
                                       "non-text-exclusive; not given by the paper: 0.5)."})
    partition_seed: int = field(
        default=0, metadata={"help": "Seed of the random interleaved partition (with the module name; the global "
                                     "RNG is not used). The partition is also saved with the adapter weights."})
    num_layers: Optional[int] = field(
        default=None, metadata={"help": "L of the layer-wise share: the language model's layer count (filled from "
                                        "the model config when the adapter is created)."})
    modality_token_ids: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "Placeholder token id of each modality in the model the adapter was made "
                                        "for (filled when created). Loading onto a base whose ids differ is refused."})
    add_to_model_loss: bool = field(
        default=False, metadata={"help": "False: the constraint term is handed to the loop as outputs.imod_loss "
                                         "(mmbalance's SFT task adds it). True: it is added to outputs.loss, for "
                                         "trainers that only read the model's loss (HF Trainer, TRL)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = IMOD_PEFT_TYPE
        if self.use_dora or self.target_parameters:
            raise ValueError("ImodConfig: use_dora / target_parameters are LoRA variants IMoD does not support")
        for name in ("decouple_weight", "align_weight", "shared_ratio_growth"):
            if getattr(self, name) < 0:
                raise ValueError(f"ImodConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("shared_ratio", "text_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ImodConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.shared_ratio + self.shared_ratio_growth > 1 + 1e-9:
            raise ValueError(f"ImodConfig.shared_ratio + shared_ratio_growth must be <= 1 (the deepest layer's "
                             f"shared share), got {self.shared_ratio} + {self.shared_ratio_growth}")
        from torch import nn

        from mmbalance_llm.adapters.imod.layer import ImodLinear

        self._register_custom_module({nn.Linear: ImodLinear})

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["peft_type"] = str.__str__(self.peft_type)  # plain "IMOD" for JSON / YAML writers
        return d


IMOD_ONLY_FIELDS = ("decouple_weight", "align_weight", "shared_ratio", "shared_ratio_growth", "text_ratio",
                    "partition_seed", "num_layers", "add_to_model_loss")
