"""Training: the Accelerate loop, checkpoints and resume, logging."""
from mmbalance_llm.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
