"""Attention with decoupled key and value heads (DHA): query head ``i`` scores against key head
``k_map[i]`` and reads value head ``v_map[i]``, where the two maps group the query heads
differently.

``decoupled_attend(q, k, v, mask, k_map=..., v_map=...)`` never expands K or V to all ``h``
query heads in memory. Two paths:

- **grouped** (decoding: few queries, no gradient): the query heads are ordered by key head, so
  each key head's scores are one matmul; the probability rows are then regrouped by value head
  (one ``index_select`` of ``(B, h, Tq, C)`` rows) so each value head's output is one matmul.
  The key axis is walked in chunks of ``chunk`` keys (2048 by default) with an online softmax,
  so the temporaries stay under a MB. Expanding K/V to all heads instead is many times slower
  than MHA's decode step; the figures, for both, are in ``benchmarks/results/dha_cpu.md``.
- **paired** (prefill and training): every distinct (key head, value head) pair that some query
  head uses becomes one kv head (``index_select`` of at most ``h`` heads, usually fewer), and
  :func:`headmods.functional.attend` runs SDPA (flash, dropout, backward) over it with a
  query->pair map. When ``k_map == v_map`` there is nothing to pair: it is plain grouped
  attention with no copy at all. The transient pair tensor is ``O(T d)`` per pair, far below the
  ``O(T^2)`` scores the grouped path would materialize for long queries.

Shapes: ``q (B, h, Tq, d)``, ``k (B, n_k, Tk, d)``, ``v (B, n_v, Tk, dv)``, ``out (B, h, Tq, dv)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .attend import attend, check_kv_map, resolve_impl
from .masks import AttentionMask

__all__ = ["decoupled_attend", "head_pairs", "GROUPED_MAX_QUERIES"]

GROUPED_MAX_QUERIES = 16  # the grouped path serves decoding steps (and short verification blocks)


def head_pairs(k_map: Sequence[int], v_map: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """The distinct (key head, value head) pairs the query heads use, and each query head's pair.

    Returns ``(pair_k, pair_v, pair_of_head)``: pair ``p`` reads key head ``pair_k[p]`` and value
    head ``pair_v[p]``; query head ``i`` uses pair ``pair_of_head[i]``.

    Example:
        >>> head_pairs([0, 0, 1, 1], [0, 1, 0, 1])
        ([0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 2, 3])
        >>> head_pairs([0, 0, 1, 1], [0, 0, 0, 0])
        ([0, 1], [0, 0], [0, 0, 1, 1])
    """
    pairs = sorted(set(zip(k_map, v_map)))
    index = {pair: p for p, pair in enumerate(pairs)}
    return [a for a, _ in pairs], [b for _, b in pairs], [index[pair] for pair in zip(k_map, v_map)]


def decoupled_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask | None = None,
    *,
    k_map: Sequence[int],
    v_map: Sequence[int],
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
    need_weights: bool = False,
    chunk: int = 2048,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention where keys and values have their own head groupings.

    Args:
        q, k, v: ``(B, h, Tq, d)``, ``(B, n_k, Tk, d)``, ``(B, n_v, Tk, dv)``.
        mask: internal mask; None attends everywhere.
        k_map, v_map: query head -> key head, query head -> value head (every head used).
        scale: score scale, ``1/sqrt(d)`` by default.
        dropout_p: dropout on the probabilities (pass 0 in eval).
        impl: kernel of the paired path (``"auto" | "sdpa" | "eager" | "flex"``).
        need_weights: also return ``(B, h, Tq, Tk)`` probabilities (eager only).
        chunk: keys per step of the grouped path's online softmax.

    Example:
        >>> q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 3, 6, 8)
        >>> out, _ = decoupled_attend(q, k, v, k_map=[0, 0, 1, 1], v_map=[0, 1, 2, 0])
        >>> out.shape
        torch.Size([1, 4, 1, 8])
    """
    k_map, v_map = tuple(int(j) for j in k_map), tuple(int(j) for j in v_map)
    check_kv_map(k_map, q.size(1), k.size(1), name="k_map", heads="key heads")
    check_kv_map(v_map, q.size(1), v.size(1), name="v_map", heads="value heads")
    if k.size(0) != q.size(0) or v.size(0) != q.size(0) or k.size(2) != v.size(2):
        raise ValueError(f"k and v must match q's batch and each other's length, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    impl = resolve_impl(impl, need_weights)
    mask = mask or AttentionMask()
    if k_map == v_map and k.size(1) == v.size(1):
        return attend(q, k, v, mask, kv_map=k_map, scale=scale, dropout_p=dropout_p, impl=impl,
                      need_weights=need_weights)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if impl == "sdpa" and not grad and dropout_p == 0.0 and q.size(2) <= GROUPED_MAX_QUERIES:
        if q.size(2) == 1:  # one query at the end of the keys: causality masks nothing
            bias = None if mask.bias is None else mask.bias.to(q.dtype)
        else:
            bias = mask.materialize(q.size(2), k.size(2), dtype=q.dtype, device=q.device)
        return _grouped(q, k, v, bias, k_map, v_map, scale, chunk), None
    pair_k, pair_v, pair_of_head = head_pairs(k_map, v_map)
    kp = k.index_select(1, torch.tensor(pair_k, device=k.device))  # (B, pairs, Tk, d), transient
    vp = v.index_select(1, torch.tensor(pair_v, device=v.device))
    return attend(q, kp, vp, mask, kv_map=pair_of_head, scale=scale, dropout_p=dropout_p, impl=impl,
                  need_weights=need_weights)


class _Groups:
    """Query heads ordered by the head they read: ``order`` and the group sizes in that order."""

    def __init__(self, head_map: tuple[int, ...], num_groups: int, device: torch.device) -> None:
        members = [[i for i, j in enumerate(head_map) if j == g] for g in range(num_groups)]
        self.order = [i for group in members for i in group]
        self.sizes = [len(group) for group in members]
        self.uniform = len(set(self.sizes)) == 1
        self.index = torch.tensor(self.order, device=device)

    def matmul(self, x: Tensor, y: Tensor) -> Tensor:
        """``x (B, h, R, C)`` rows in group order times ``y (B, g, C, E)`` -> ``(B, h, R, E)``."""
        B, h, R, C = x.shape
        if self.uniform:
            g = len(self.sizes)
            return torch.matmul(x.reshape(B, g, (h // g) * R, C), y).view(B, h, R, y.size(-1))
        parts, start = [], 0
        for j, size in enumerate(self.sizes):
            part = x[:, start:start + size].reshape(B, size * R, C)
            parts.append(torch.matmul(part, y[:, j]).view(B, size, R, y.size(-1)))
            start += size
        return torch.cat(parts, dim=1)

    def transposed(self, q: Tensor) -> list[Tensor]:
        """Per group (one entry when uniform), its queries as ``(B, [g,] d, size * R)``, contiguous."""
        B, h, R, d = q.shape
        if self.uniform:
            g = len(self.sizes)
            return [q.reshape(B, g, (h // g) * R, d).transpose(-1, -2)]
        parts, start = [], 0
        for size in self.sizes:
            parts.append(q[:, start:start + size].reshape(B, size * R, d).transpose(-1, -2))
            start += size
        return parts

    def scores(self, q_t: list[Tensor], k: Tensor, R: int) -> Tensor:
        """Keys ``k (B, g, C, d)`` times :meth:`transposed` queries -> scores ``(B, h, R, C)``.

        Computed as ``K Q^T`` (keys as the left operand, read row by row straight from the
        cache), which timed faster than ``Q K^T`` on long caches (``benchmarks/bench_dha.py``).
        """
        B, C = k.size(0), k.size(2)
        if self.uniform:
            return torch.matmul(k, q_t[0]).transpose(-1, -2).reshape(B, len(self.order), R, C)
        parts = [torch.matmul(k[:, j], q_j).transpose(-1, -2).reshape(B, size, R, C)
                 for j, (size, q_j) in enumerate(zip(self.sizes, q_t))]
        return torch.cat(parts, dim=1)


def _grouped(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, k_map: tuple[int, ...],
             v_map: tuple[int, ...], scale: float | None, chunk: int) -> Tensor:
    """Grouped scores, regrouped probabilities, chunked online softmax (no K/V expansion)."""
    B, h, Tq, d = q.shape
    Tk = k.size(2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    by_k, by_v = _Groups(k_map, k.size(1), q.device), _Groups(v_map, v.size(1), q.device)
    position_in_k = {head: p for p, head in enumerate(by_k.order)}
    k_to_v = torch.tensor([position_in_k[head] for head in by_v.order], device=q.device)  # v-order <- k-order
    q_t = by_k.transposed(q.index_select(1, by_k.index) * scale)  # key-head order, transposed once
    if bias is not None and bias.size(1) > 1:
        bias = bias.index_select(1, by_k.index)
    m = q.new_full((B, h, Tq, 1), float("-inf"))  # running max, key-head order
    denom = q.new_zeros(B, h, Tq, 1)  # running sum, key-head order
    acc = q.new_zeros(B, h, Tq, v.size(-1))  # running output, value-head order
    for start in range(0, Tk, chunk):
        end = min(start + chunk, Tk)
        scores = by_k.scores(q_t, k[:, :, start:end], Tq)  # (B, h, Tq, C), key-head order
        if bias is not None:
            scores = scores + bias[..., start:end]
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        m_safe = m_new if bias is None else m_new.masked_fill(torch.isneginf(m_new), 0.0)  # rows with no key yet
        p = torch.exp(scores - m_safe)
        alpha = torch.exp(m - m_safe)
        denom = denom * alpha + p.sum(dim=-1, keepdim=True)
        p_v = p.index_select(1, k_to_v)  # probability rows regrouped by value head
        acc = acc * alpha.index_select(1, k_to_v) + by_v.matmul(p_v, v[:, :, start:end])
        m = m_new
    denom = denom.index_select(1, k_to_v)
    out = torch.where(denom > 0, acc / denom.clamp_min(torch.finfo(acc.dtype).tiny), 0.0)  # no key: zero row
    return out.index_select(1, torch.argsort(by_v.index))  # back to query-head order
