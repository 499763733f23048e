"""Rotary position embeddings in Hugging Face's rotate-half layout.

The layout (LLaMA in transformers): a head vector of size ``d`` is split into halves
``(x1, x2)``; frequency ``f_i = theta ** (-2 i / d)`` rotates the pair ``(x1[i], x2[i])``.
``cos``/``sin`` carry each frequency twice, ``cat([f, f])``, so rotation is
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat([-x2, x1])``.

GGUF / llama.cpp store q and k rows interleaved instead; readers must undo that permutation
before these functions apply.

Positions are explicit: ``positions`` holds each token's absolute position, so a decoding step
with ``n`` cached tokens uses ``positions = n, n+1, ...`` (:func:`positions_from`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_inv_freq", "rope_cos_sin", "rotate_half", "apply_rope", "positions_from"]


def rope_inv_freq(head_dim: int, theta: float = 10000.0, *, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)`` for ``i < head_dim / 2``, float32, shape ``(head_dim // 2,)``."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope_theta must be positive, got {theta}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def positions_from(offset: int, seq_len: int, *, device: torch.device | str | None = None) -> Tensor:
    """Positions ``offset, offset + 1, ..., offset + seq_len - 1`` as a ``(seq_len,)`` int64 tensor."""
    return torch.arange(offset, offset + seq_len, device=device)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0, *,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``cos``, ``sin`` of shape ``(B, T, head_dim)`` (or ``(1, T, head_dim)`` for 1-D positions).

    Angles are computed in float32 whatever ``dtype`` is, as transformers does.

    >>> cos, sin = rope_cos_sin(torch.arange(4), head_dim=8)
    >>> cos.shape, float(cos[0, 0, 0])
    (torch.Size([1, 4, 8]), 1.0)
    """
    if positions.dim() == 1:
        positions = positions[None]
    if positions.dim() != 2:
        raise ValueError(f"positions must have shape (seq_len,) or (batch, seq_len), got {tuple(positions.shape)}")
    if positions.is_floating_point():
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    inv_freq = rope_inv_freq(head_dim, theta, device=positions.device)
    angles = positions.float()[..., None] * inv_freq  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """``cat([-x2, x1])`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` of shape ``(B, h, T, d)`` by ``cos``/``sin`` of shape ``(B|1, T, d)``.

    >>> x = torch.randn(1, 2, 3, 8)
    >>> cos, sin = rope_cos_sin(torch.zeros(3, dtype=torch.long), 8)
    >>> torch.equal(apply_rope(x, cos, sin), x)  # position 0 is the identity
    True
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
    return x * cos + rotate_half(x) * sin
