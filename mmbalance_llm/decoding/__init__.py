"""Inference-time decoding interventions for HF MLLMs (Fork-Merge Decoding)."""
from mmbalance_llm.decoding.fork_merge import FMDConfig, ForkMerge, decoding_context, fork_merge

__all__ = ["FMDConfig", "ForkMerge", "decoding_context", "fork_merge"]
