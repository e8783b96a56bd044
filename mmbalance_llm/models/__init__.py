"""Models: encoders, fusion heads and the multimodal classifier."""
from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig
from mmbalance_llm.models.outputs import MultimodalOutput

__all__ = ["MultimodalClassifier", "MultimodalClassifierConfig", "MultimodalOutput"]
