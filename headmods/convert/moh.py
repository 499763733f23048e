"""Converting a model's attention to MoH with importance-chosen shared heads.

The paper makes the *first* ``h_s`` heads of each layer the shared ones. Here any per-layer head
scores (e.g. ``headmods.prune.head_importance`` on the model with plain ``mha`` swapped in) can
choose them instead: the ``h_s`` highest-scoring heads of each layer stay always on.

Example:
    >>> import torch, headmods
    >>> from torch import nn
    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, batch_first=True), 1)
    >>> report = swap_moh(enc, {"layers.0.self_attn": torch.tensor([0.1, 0.9, 0.5, 0.2])}, shared_heads=1)
    >>> enc.layers[0].self_attn.config.shared_heads
    1
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..swap import SwapReport, swap

__all__ = ["shared_from_scores", "swap_moh"]


def shared_from_scores(scores: Mapping[str, Tensor | Sequence[float]], shared_heads: int) -> dict[str, list[int]]:
    """Per layer, the ``shared_heads`` heads with the highest scores (ties: lower index first)."""
    chosen = {}
    for path, s in scores.items():
        values = [float(v) for v in s]
        if shared_heads > len(values):
            raise ValueError(f"layer {path!r} has {len(values)} heads; cannot share {shared_heads}")
        chosen[path] = sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:shared_heads])
    return chosen


def swap_moh(model: nn.Module, scores: Mapping[str, Tensor | Sequence[float]], *, shared_heads: int,
             **cfg: Any) -> SwapReport:
    """Swap every scored attention module for MoH, sharing its highest-scoring heads."""
    report = SwapReport("moh")
    report.params_before = sum(p.numel() for p in model.parameters())
    for path, heads in shared_from_scores(scores, shared_heads).items():
        one = swap(model, "moh", targets=[path], shared_heads=shared_heads, shared_index=heads, **cfg)
        report.replaced += one.replaced
    report.params_after = sum(p.numel() for p in model.parameters())
    return report
