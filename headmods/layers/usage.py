"""Usage statistics of routed heads: a bias-corrected exponential moving average.

A plain EMA started at zero under-reports for its first ~1/(1-decay) updates; dividing by
``1 - decay**steps`` (as Adam does for its moments) makes the value a proper running average from
the first forward, so usage thresholds mean "fraction of tokens" at any point of a run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["UsageEMA"]


class UsageEMA(nn.Module):
    """EMA of a per-head statistic (e.g. the fraction of tokens routed to each head)."""

    def __init__(self, size: int | tuple[int, ...], decay: float, *, device=None) -> None:
        super().__init__()
        self.decay = decay
        self.steps = 0
        self.register_buffer("ema", torch.zeros(size, device=device), persistent=False)

    @torch.no_grad()
    def update(self, value: Tensor) -> None:
        self.ema.mul_(self.decay).add_((1 - self.decay) * value.detach().to(self.ema))
        self.steps += 1

    def value(self) -> Tensor:
        """The bias-corrected average (zeros before the first update)."""
        if self.steps == 0 or self.decay == 0:
            return self.ema.clone()
        return self.ema / (1 - self.decay ** self.steps)

    def keep(self, index: list[int]) -> None:
        """Restrict a per-head statistic to the kept heads."""
        self.ema = self.ema[index].clone()
