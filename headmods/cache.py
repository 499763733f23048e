"""A key/value cache for incremental decoding with headmods layers used natively.

One :class:`KVCache` per attention layer holds the keys and values of past tokens,
``(B, h_kv, T, d)`` (DHA: ``n_k`` key heads and ``n_v`` value heads), after RoPE (so a cached key never needs rotating again). With
``max_len`` it allocates that length once and refuses to go past it; without, it grows by
doubling, so appending ``n`` tokens one at a time copies O(n) elements in total, not O(n^2).

Hugging Face ``Cache`` objects are adapted in ``headmods.integrations``; any object with
``seq_len`` and ``update(k, v) -> (k_all, v_all)`` can stand in for this class.

Decode state belongs to the cache, not to the layer. Layers whose method needs more of the past
than keys and values (LongHeads' chunk representations, RCMHA's convolution tails) keep it in the
cache's ``layer_states`` (one entry per layer, see :func:`layer_state`), so a layer can decode
several sequences in turn, each with its own cache, and a copy of the layer carries no state.

Example:
    >>> import headmods
    >>> attn = headmods.MultiHeadAttention(64, 4, batch_first=True).eval()
    >>> cache = KVCache()
    >>> x = torch.randn(2, 5, 64)
    >>> out, _ = attn(x[:, :4], is_causal=True, cache=cache)   # prefill
    >>> step, _ = attn(x[:, 4:], is_causal=True, cache=cache)  # one new token
    >>> cache.seq_len
    5
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch  # noqa: F401  (used by the doctest above)
from torch import Tensor, nn

__all__ = ["KVCache", "layer_state"]

S = TypeVar("S")


def layer_state(cache: Any, layer: nn.Module, factory: Callable[[], S]) -> S:
    """The decode state that ``cache`` keeps for ``layer``, created by ``factory()`` on first use.

    States live in ``cache.layer_states``, a mapping keyed weakly by the layer; a cache without
    one (any :class:`~headmods.layers.base.CacheLike` object) gets one on first use.

    Example:
        >>> cache, layer = KVCache(), nn.Linear(1, 1)
        >>> layer_state(cache, layer, dict) is layer_state(cache, layer, dict)
        True
    """
    states = getattr(cache, "layer_states", None)
    if states is None:
        states = weakref.WeakKeyDictionary()
        try:
            cache.layer_states = states
        except AttributeError:
            raise TypeError(f"{type(layer).__name__} keeps decode state in its cache, and a {type(cache).__name__} "
                            "cannot hold it (no layer_states attribute); use headmods.KVCache or a transformers "
                            "Cache") from None
    state = states.get(layer)
    if state is None:
        state = states[layer] = factory()
    return state


class KVCache(nn.Module):
    """Keys and values of past tokens for one attention layer.

    Args:
        max_len: capacity in tokens; allocated on the first ``update``. None grows on demand.
    """

    def __init__(self, max_len: int | None = None) -> None:
        super().__init__()
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.max_len = max_len
        self.seq_len = 0
        self.register_buffer("k", None, persistent=False)  # (B, h_kv, capacity, d)
        self.register_buffer("v", None, persistent=False)  # (B, h_kv, capacity, dv)
        self.layer_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see layer_state()

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def reset(self) -> None:
        """Forget every token and every layer's decode state; keeps the allocated memory."""
        self.seq_len = 0
        self.layer_states.clear()

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k (B, n_k, T, d)`` and ``v (B, n_v, T, dv)``; return all keys and values so far."""
        self._check(k, v)
        if self.seq_len == 0 and self.k is not None and self._layout(self.k, self.v) != self._layout(k, v):
            self.k = self.v = None  # a new sequence of another shape: reallocate
        end = self.seq_len + k.size(2)
        if end > self.capacity:
            self._grow(end, k, v)
        self.k[:, :, self.seq_len:end] = k
        self.v[:, :, self.seq_len:end] = v
        self.seq_len = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _check(self, k: Tensor, v: Tensor) -> None:
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"k and v must have shape (batch, kv_heads, seq, head_dim), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.size(0) != v.size(0) or k.size(2) != v.size(2):
            raise ValueError(f"k and v disagree in (batch, seq): {tuple(k.shape)} vs {tuple(v.shape)}")
        if self.seq_len > 0 and self._layout(self.k, self.v) != self._layout(k, v):
            raise ValueError(f"this cache holds (batch, k_heads, head_dim, v_heads, v_dim, dtype, device) = "
                             f"{self._layout(self.k, self.v)}, got {self._layout(k, v)}; "
                             "call reset() to start a new sequence")

    @staticmethod
    def _layout(k: Tensor, v: Tensor) -> tuple:
        return (k.size(0), k.size(1), k.size(3), v.size(1), v.size(3), k.dtype, k.device)

    def _grow(self, needed: int, k: Tensor, v: Tensor) -> None:
        if self.max_len is not None:
            if needed > self.max_len:
                raise ValueError(f"KVCache(max_len={self.max_len}) cannot hold {needed} tokens")
            capacity = self.max_len
        else:
            capacity = max(needed, 2 * self.capacity, 16)
        new_k = k.new_empty(k.size(0), k.size(1), capacity, k.size(3))
        new_v = v.new_empty(v.size(0), v.size(1), capacity, v.size(3))
        if self.seq_len:
            new_k[:, :, :self.seq_len] = self.k[:, :, :self.seq_len]
            new_v[:, :, :self.seq_len] = self.v[:, :, :self.seq_len]
        self.k, self.v = new_k, new_v
