"""``MokaConfig``: the peft config of MokA (Wei et al., NeurIPS 2025, arXiv 2506.05191)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig



class MokaPeftType(str):
    """MokA's ``peft_type``: the string ``"MOKA"`` that also answers like a ``peft.PeftType`` member.

    peft's ``PeftType`` enum is closed, and adding a member would mean editing CPython enum internals of another
    library. This ``str`` subclass equals and hashes as ``"MOKA"`` (so peft's mappings, ``==`` checks and
    ``adapter_config.json`` see the plain string) and has the ``.value`` / ``.name`` that transformers'
    ``load_adapter``, peft's hotswap / mixed-model checks and model-card code read.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)


MOKA_PEFT_TYPE = MokaPeftType("MOKA")
KNOWN_MODALITIES = ("image", "video", "audio")


@dataclass
class MokaConfig(LoraConfig):
    """Configuration of a MokA adapter: one low-rank ``A`` per modality, cross-attention from non-text tokens to
    the question text in the rank-``r`` space, and one shared ``B``::

        h_t = A_t x_t,   h_m = A_m x_m + w * m_m * softmax(h_m h_q^T / sqrt(r)) h_q   (m = image, video, audio)
        y   = W0 x + (lora_alpha / r) * B (h_t + sum_m h_m)

    ``MokaConfig()`` with no arguments works on every supported family: the non-text modalities and the target
    modules (the language model's attention and MLP projections only) come from the model's modality map when
    the adapter is created, and are written into ``adapter_config.json``.

    Defaults follow the paper's released audio-visual-text code (r=4 per modality, alpha=16, dropout 0.05,
    cross-attention weight 1). The VisualText code uses weight 0.05, and the audio-visual code applies the
    ``alpha/r`` scaling *before* the cross-attention; here scaling multiplies ``B``'s output as in LoRA and the
    VisualText code, so the attention temperature does not depend on alpha. Every other LoRA field keeps its
    peft meaning; DoRA and other LoRA variants are refused.
    """

    r: int = field(default=4, metadata={"help": "Rank of every per-modality A matrix and of the shared B (the paper's '444' = 3 A's of rank 4)."})
    lora_alpha: int = field(default=16, metadata={"help": "Scaling numerator: the adapter output is multiplied by lora_alpha / r (paper: 16)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input before the A matrices (paper: 0.05)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules to adapt. None: the language model's q/k/v/o/gate/up/down projections only, "
                          "from the modality map (the towers also contain q_proj names)."},
    )
    modalities: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Non-text modalities that get their own A (subset of image, video, audio). None: all of "
                          "the architecture's modalities, from the modality map. Tokens of a modality without an A "
                          "use the text A."},
    )
    cross_attention_weight: float = field(
        default=1.0,
        metadata={"help": "Weight w of the cross-attention term added to non-text rows (paper AVT code: 1.0; "
                          "VisualText code: 0.05). 0 disables the cross-attention."},
    )
    question_after_media: bool = field(
        default=True,
        metadata={"help": "Keys/values of the cross-attention are the text tokens after the last media token and "
                          "before the answer (reference code); False: all prompt text before the answer."},
    )

    modality_token_ids: Optional[dict[str, int]] = field(
        default=None,
        metadata={"help": "Placeholder token id of each modality in the model the adapter was made for (filled "
                          "when the adapter is created). Loading onto a base whose ids differ is refused."},
    )

    answer_marker_ids: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Token ids of the chat template's assistant header (e.g. 'ASSISTANT:'), from "
                          "mmbalance_llm.adapters.moka.answer_marker_ids(processor). Used only when labels also "
                          "supervise the prompt (TRL on 'messages' data): the question ends at this header."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MOKA_PEFT_TYPE
        if self.modalities is not None:
            self.modalities = list(self.modalities)
            bad = [m for m in self.modalities if m not in KNOWN_MODALITIES]
            if bad:
                raise ValueError(f"MokaConfig.modalities: unknown modality {bad[0]!r}; choose from {KNOWN_MODALITIES}")
        if self.use_dora or self.target_parameters:
            raise ValueError("MokaConfig: use_dora / target_parameters are LoRA variants MokA does not support")
        if self.cross_attention_weight < 0:
            raise ValueError(f"MokaConfig.cross_attention_weight must be >= 0, got {self.cross_attention_weight}")
        # the custom layer is how peft's LoRA machinery builds MokA layers for nn.Linear targets
        from torch import nn

        from mmbalance_llm.adapters.moka.layer import MokaLinear

        self._register_custom_module({nn.Linear: MokaLinear})

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["peft_type"] = str.__str__(self.peft_type)  # plain "MOKA" for JSON / YAML writers
        return d
