"""Attention masks: one internal convention, and converters from every convention we meet.

The internal convention is :class:`AttentionMask`: an optional *additive float bias* plus a
``causal`` flag.

- ``bias`` broadcasts to ``(B, h, Tq, Tk)``; ``0`` means attend, ``-inf`` means blocked, any
  other finite value is added to the score (ALiBi-style biases pass through unchanged).
- ``causal`` means query ``i`` sees keys ``j <= i + (Tk - Tq)``: the causal diagonal is aligned
  to the *end* of the keys, so a query block that follows ``Tk - Tq`` cached keys stays causal.
  (SDPA's own ``is_causal`` aligns to the start; :meth:`AttentionMask.for_sdpa` handles that.)

Keeping ``causal`` apart from the bias lets SDPA use its causal fast path when nothing else is
masked. A query row that ends up with no key to attend to yields a zero output (never NaN) in
every backend of :mod:`headmods.functional.attend`.

Converters, one per source convention:

======================  =====================================  ====================
source                  bool ``True`` means                    function
======================  =====================================  ====================
``nn.MultiheadAttention``  masked out (float: added)           :func:`from_mha`
``F.scaled_dot_product_attention``  attend (float: added)      :func:`from_sdpa`
Hugging Face 2-D mask   ``1`` = keep, ``0`` = padding          :func:`from_hf_padding`
======================  =====================================  ====================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AttentionMask",
    "causal_bias",
    "from_mha",
    "from_sdpa",
    "from_hf_padding",
]


@dataclass(frozen=True)
class AttentionMask:
    """Additive float ``bias`` (4-D, broadcastable to ``(B, h, Tq, Tk)``) plus an end-aligned ``causal`` flag."""

    bias: Tensor | None = None
    causal: bool = False

    def materialize(self, q_len: int, k_len: int, *, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """The whole mask as one additive tensor (causal folded in), or None when nothing is masked."""
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.causal:
            bias = _add(bias, causal_bias(q_len, k_len, dtype=dtype, device=device)[None, None])
        return bias

    def for_sdpa(self, q_len: int, k_len: int, *, dtype: torch.dtype, device: torch.device) -> tuple[Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for ``F.scaled_dot_product_attention``.

        Uses SDPA's causal fast path when it means the same thing (square, nothing else masked);
        a single query at the end of the keys needs no causal mask at all.
        """
        if self.causal and self.bias is None and q_len == k_len:
            return None, True
        if self.causal and q_len == 1:
            return (None if self.bias is None else self.bias.to(dtype)), False
        return self.materialize(q_len, k_len, dtype=dtype, device=device), False


def causal_bias(q_len: int, k_len: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Tensor:
    """``(Tq, Tk)`` additive mask: 0 where ``j <= i + (Tk - Tq)``, ``-inf`` above that diagonal.

    >>> causal_bias(2, 3)
    tensor([[0., 0., -inf],
            [0., 0., 0.]])
    """
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return _bool_keep_to_bias(keep, dtype)


def _bool_keep_to_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """bool ``True`` = attend  ->  additive 0 / -inf."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    if mask.is_floating_point() and torch.isnan(mask).any():
        raise ValueError(f"{name} contains NaN; use -inf to block a position")


def _add(bias: Tensor | None, extra: Tensor) -> Tensor:
    return extra if bias is None else bias + extra


def from_mha(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool = False,
    *,
    batch_size: int,
    num_heads: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
) -> AttentionMask:
    """Convert ``nn.MultiheadAttention``'s masks (bool ``True`` = masked out; float = added).

    Args:
        key_padding_mask: ``(B, Tk)``; bool or float.
        attn_mask: ``(Tq, Tk)`` or ``(B * num_heads, Tq, Tk)``; bool or float.
        is_causal: causal masking. Unlike MHA, where it is only a hint that ``attn_mask`` is
            causal, here it *applies* a causal mask, combined with ``attn_mask`` when both are
            given (the same result when ``attn_mask`` is itself causal, as MHA requires).

    Example:
        >>> m = from_mha(torch.tensor([[False, True]]), None, batch_size=1, num_heads=2,
        ...              q_len=2, k_len=2, dtype=torch.float32)
        >>> m.bias.shape
        torch.Size([1, 1, 1, 2])
    """
    bias = None
    if key_padding_mask is not None:
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (batch_size, k_len):
            raise ValueError(f"key_padding_mask must have shape (batch, key_len) = {(batch_size, k_len)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask
        kpm = _bool_keep_to_bias(~kpm, dtype) if kpm.dtype == torch.bool else kpm.to(dtype)
        bias = kpm[:, None, None, :]  # (B, 1, 1, Tk)
    if attn_mask is not None:
        _check_mask_dtype("attn_mask", attn_mask)
        shape = tuple(attn_mask.shape)
        if shape == (q_len, k_len):
            am = attn_mask[None, None]  # (1, 1, Tq, Tk)
        elif shape == (batch_size * num_heads, q_len, k_len):
            am = attn_mask.view(batch_size, num_heads, q_len, k_len)  # (B, h, Tq, Tk)
        else:
            raise ValueError(f"attn_mask must have shape (query_len, key_len) = {(q_len, k_len)} or "
                             f"(batch * num_heads, query_len, key_len) = {(batch_size * num_heads, q_len, k_len)}, "
                             f"got {shape}")
        am = _bool_keep_to_bias(~am, dtype) if am.dtype == torch.bool else am.to(dtype)
        bias = _add(bias, am)
    return AttentionMask(bias, bool(is_causal))


def from_sdpa(attn_mask: Tensor | None, is_causal: bool = False) -> AttentionMask:
    """Convert an SDPA-style mask (bool ``True`` = attend; float = added), broadcastable to ``(B, h, Tq, Tk)``.

    >>> from_sdpa(torch.tensor([[True, False]])).bias
    tensor([[[[0., -inf]]]])
    """
    if attn_mask is None:
        return AttentionMask(None, bool(is_causal))
    _check_mask_dtype("attn_mask", attn_mask)
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to (batch, heads, query_len, key_len), got {tuple(attn_mask.shape)}")
    bias = _bool_keep_to_bias(attn_mask, torch.float32) if attn_mask.dtype == torch.bool else attn_mask
    return AttentionMask(bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape)), bool(is_causal))


def from_hf_padding(attention_mask: Tensor | None, *, causal: bool = False,
                    dtype: torch.dtype = torch.float32) -> AttentionMask:
    """Convert a Hugging Face 2-D ``attention_mask`` ``(B, Tk)`` (1 = keep, 0 = padding).

    >>> from_hf_padding(torch.tensor([[1, 1, 0]]), causal=True).bias.shape
    torch.Size([1, 1, 1, 3])
    """
    if attention_mask is None:
        return AttentionMask(None, causal)
    if attention_mask.dim() != 2:
        raise ValueError(f"a Hugging Face padding mask must have shape (batch, key_len), "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        keep = attention_mask != 0
    else:
        keep = attention_mask.bool()
    return AttentionMask(_bool_keep_to_bias(keep, dtype)[:, None, None, :], causal)
