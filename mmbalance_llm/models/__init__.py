"""Models: encoders, fusion heads and the multimodal classifiers.

Importing this package registers every classifier architecture of the toolkit (the concat/sum/film/gated
classifier, the attention-fusion FusionTransformer, MLA's shared head, Greedy's MMTM) with `AutoConfig` /
`AutoModel`, so `AutoModel.from_pretrained(run/best)` loads any of them."""
from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig
from mmbalance_llm.models.fusion_transformer import FusionTransformer, FusionTransformerConfig
from mmbalance_llm.models.mmtm import MMTMClassifier, MMTMConfig
from mmbalance_llm.models.outputs import MultimodalOutput
from mmbalance_llm.models.shared_head import SharedHeadClassifier, SharedHeadConfig

__all__ = ["FusionTransformer", "FusionTransformerConfig", "MMTMClassifier", "MMTMConfig", "MultimodalClassifier",
           "MultimodalClassifierConfig", "MultimodalOutput", "SharedHeadClassifier", "SharedHeadConfig"]
