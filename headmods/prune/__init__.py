"""Head pruning: importance scores, plans, structural removal and reports.

The stage runs score -> plan -> prune -> report (then fine-tune, with a new optimizer):

- :func:`head_importance` scores every query head of every prunable headmods layer
  (``"magnitude"``, ``"ablation"``, ``"taylor"``).
- :func:`plan_from_scores` keeps the best heads (global ratio or per layer, ignore list,
  ``min_heads``, ``uniform`` for HF export); :class:`HeadPrunePlan` round-trips through JSON and
  :func:`validate_plan` checks it against a model.
- :func:`prune_heads` removes heads physically (GQA-aware) and returns a :class:`PruneReport`
  of heads, parameters, MACs (:func:`count_macs`) and latency before and after.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from headmods import MultiHeadAttention
    >>> model = nn.Sequential(MultiHeadAttention(16, 4, batch_first=True), MultiHeadAttention(16, 4, batch_first=True))
    >>> plan = plan_from_scores(head_importance(model, "magnitude"), ratio=0.5)
    >>> report = prune_heads(model, plan)
    >>> sum(row.heads_after for row in report.layers)
    4
"""

from .importance import head_importance
from .plan import HeadPrunePlan, plan_from_scores, validate_plan
from .report import PruneReport
from .structural import count_macs, prune_heads

__all__ = ["head_importance", "HeadPrunePlan", "plan_from_scores", "validate_plan", "prune_heads",
           "count_macs", "PruneReport"]
