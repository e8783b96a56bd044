"""`none`: the plain baseline, fused cross-entropy only.

Follows: paper only (plain joint training with one fused cross-entropy). Differences: none.
"""
from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import Balancer


@register
class NoBalancing(Balancer):
    name = "none"
    stage = "none"
    paper = "Plain joint training (the baseline every method is compared with)."
