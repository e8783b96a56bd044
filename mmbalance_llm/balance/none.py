"""`none`: the plain baseline: the task's own loss (classify: fused cross-entropy; sft: the LM loss).

Follows: paper only (plain joint training with one loss). Differences: none.
"""
from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer


@register
class NoBalancing(Balancer):
    name = "none"
    stage = "none"
    paper = "Plain joint training (the baseline every method is compared with)."
    tasks = ("classify", "sft")
