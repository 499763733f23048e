"""RCMHA kernels: a causal depthwise convolution over the sequence, and learned relative-position logits.

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
Sugiharto, Aradea, Mubarok, arXiv 2308.03429; the method page is ``docs/methods/rcmha.md``. The layer is
:class:`headmods.layers.rcmha.RCMHAttention`; these functions hold its math.

**Causal depthwise convolution** (:func:`causal_depthwise_conv`), on the per-head channels of a
``(B, h, T, d)`` tensor, along ``T``. Tap order: with kernel ``K`` and weight ``w[..., 0..K-1]``,

    ``y_t = sum_{i=0}^{K-1} w[K-1-i] * x_{t-i} + bias``,

so the *last* tap multiplies the current token and ``w[0]`` the token ``K-1`` steps back (the
order ``F.conv1d`` uses with ``K-1`` zeros of left padding). The identity is ``w = [0, ..., 0, 1]``,
bias 0. Positions before the sequence start are zeros, unless ``prev`` supplies the tokens that
came before (decoding). The weight is either shared by all heads, ``(d, K)`` with bias ``(d,)``
(the official RCMHA code: one set of ``d`` kernels), or per head, ``(h, d, K)`` with bias
``(h, d)`` (Primer's MDHA). It runs as ``K`` shifted multiply-adds in the input's own layout,
which on CPU is cheaper than a grouped ``F.conv1d`` (that needs the channels moved in front of the
sequence and back); the layer's timings are in ``benchmarks/results/rcmha_cpu.md``.

**Relative logits** (:func:`relative_index`, :func:`relative_logits`): for query ``i`` and key
``j`` the offset is ``Δ = pos_q(i) - j``, with queries aligned to the *end* of the keys,
``pos_q(i) = (Tk - Tq) + i`` (so a block of queries after ``Tk - Tq`` cached keys sits where
it belongs, as the causal mask of :mod:`headmods.functional.masks` aligns it). The logit term is
``q_i · R[row(Δ)] + b[row(Δ)]``, with ``R (n, h, d)`` and ``b (n, h)`` learned, and ``row``:

- clipped (default), ``n = 2P`` rows for ``P = max_distance``: ``row(Δ) = P + clamp(Δ, -P, P-1)``.
  Past and present offsets ``0..P-1`` own rows ``P..2P-1`` (farther ones share row ``2P-1``);
  future offsets ``-1..-P`` own rows ``P-1..0`` (farther ones share row 0). A causal layer uses
  only the upper half. (The official labml code indexes the same ``2P`` rows as ``P - Δ`` and
  does not clip, so it breaks past ``P`` tokens.)
- bucketed, ``n = num_buckets`` rows: T5's bidirectional log buckets
  (:func:`relative_buckets`): half the buckets for the past and present, half for the future;
  in each half, distances below a quarter of ``n`` get one bucket each and the rest share
  log-spaced buckets up to ``max_distance``, beyond which all share the last one.

Two ways to build the ``(B, h, Tq, Tk)`` term; a ``(Tq, Tk, d)`` tensor never exists in either.

- Gather (:func:`relative_index`, :func:`relative_logits`; the layer uses it for one query, when
  decoding): ``q · Rᵀ`` is computed once per query over only the rows the offsets in play use,
  ``(B, h, Tq, W)`` with ``W <= min(n, Tq + Tk - 1)``, and then gathered into ``(B, h, Tq, Tk)``
  along the last dimension through a ``(Tq, Tk)`` index. With ``causal``, future offsets point at
  one extra column that holds ``-inf``, so the gather also applies the causal mask (and the
  ``q · R`` window shrinks to ``Δ >= 0``).
- Skew (:func:`offset_rows`, :func:`offset_keys`, :func:`offset_logits`, :func:`skew`; the layer
  uses it for blocks of queries): ``R`` and ``b`` are laid out once per call by offset, latest key
  first, as a contiguous ``(h, d + 1, M)`` table scaled by ``scale`` (column ``m`` holds the row
  of ``Δ = Tk - 1 - m``, ``b`` in the last place). For queries ``s .. e-1`` one matmul of the
  queries with a trailing 1 against columns ``Tq - e ..`` gives ``(q · R + b) * scale`` by offset,
  written into a ``(B, h, n, n - 1 + k_end)`` table whose columns past ``M`` hold ``-inf``; row
  ``r`` of the block's bias is then a contiguous slice of table row ``r`` starting ``n - 1 - r``
  in, so :func:`skew` makes the bias an ``as_strided`` view with no gather and no copy. It needs
  only the offsets of the block's own (query, key) pairs, and its table can be reused from block
  to block.

Shapes: B batch, h heads, T / Tq / Tk lengths, d head_dim, K kernel, n relative rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["causal_depthwise_conv", "relative_buckets", "relative_rows", "num_relative_rows", "check_relative",
           "relative_index", "relative_logits", "offset_rows", "offset_keys", "offset_logits", "skew"]


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, prev: Tensor | None = None) -> Tensor:
    """Causal depthwise convolution of ``x (B, h, T, d)`` along ``T``; see the module docstring for the tap order.

    Args:
        x: ``(B, h, T, d)``.
        weight: ``(d, K)`` shared by all heads, or ``(h, d, K)`` per head; ``weight[..., K-1]``
            multiplies the current token.
        bias: ``(d,)`` or ``(h, d)``, matching ``weight``; None for none.
        prev: ``(B, h, L, d)`` with ``L <= K - 1``: the pre-convolution values of the ``L`` tokens
            just before ``x`` (oldest first); earlier positions count as zeros.

    Returns:
        ``(B, h, T, d)``.

    Example:
        >>> x = torch.randn(1, 2, 5, 4)
        >>> identity = torch.tensor([0.0, 0.0, 1.0]).expand(4, 3)  # (d, K): last tap 1
        >>> torch.equal(causal_depthwise_conv(x, identity), x)
        True
        >>> shift = torch.tensor([0.0, 1.0, 0.0]).expand(4, 3)  # the previous token
        >>> torch.equal(causal_depthwise_conv(x, shift)[:, :, 1:], x[:, :, :-1])
        True
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (batch, heads, seq, head_dim), got {tuple(x.shape)}")
    B, h, T, d = x.shape
    per_head = weight.dim() == 3
    expected = (h, d) if per_head else (d,)
    if weight.dim() not in (2, 3) or tuple(weight.shape[:-1]) != expected or weight.size(-1) < 1:
        raise ValueError(f"weight must be (head_dim, kernel) = ({d}, K) or (heads, head_dim, kernel) = ({h}, {d}, K), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != expected:
        raise ValueError(f"bias must have shape {expected} to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    K = weight.size(-1)
    L = 0 if prev is None else prev.size(2)
    if prev is not None and (prev.dim() != 4 or (prev.size(0), prev.size(1), prev.size(3)) != (B, h, d) or L > K - 1):
        raise ValueError(f"prev must have shape (batch, heads, at most kernel-1 = {K - 1}, head_dim) = "
                         f"({B}, {h}, <={K - 1}, {d}), got {tuple(prev.shape)}")

    def tap(m: int) -> Tensor:
        return weight[:, None, :, m] if per_head else weight[:, m]  # (h, 1, d) or (d,)

    y = x * tap(K - 1) if bias is None else torch.addcmul(bias[:, None] if per_head else bias, x, tap(K - 1))
    for s in range(1, K):  # tap K-1-s reads the token s steps back
        if T > s:
            y[:, :, s:].addcmul_(x[:, :, :T - s], tap(K - 1 - s))
        first, last = max(0, s - L), min(s, T)  # positions whose token s back lies in prev
        if last > first:
            y[:, :, first:last].addcmul_(prev[:, :, L + first - s:L + last - s], tap(K - 1 - s))
    return y


def relative_buckets(delta: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional log buckets of offsets ``delta = query position - key position`` (int tensor).

    Offsets ``>= 0`` (past and present) fall in buckets ``0 .. n/2 - 1``, future offsets in
    ``n/2 .. n-1``. Within a half of ``m = n/2`` buckets, distance ``a`` gets bucket ``a`` while
    ``a < m/2``, else ``m/2 + floor(log(a / (m/2)) / log(max_distance / (m/2)) * (m - m/2))``
    capped at ``m - 1``. (T5 computes the logarithms in float32; here float64.)

    >>> relative_buckets(torch.tensor([0, 1, 3, 4, 100, -1, -100]), 8, 16)
    tensor([0, 1, 2, 2, 3, 5, 7])
    """
    half = num_buckets // 2
    exact = half // 2
    future = delta < 0
    a = delta.abs()
    far = a.clamp(min=exact).double() / exact
    large = exact + (far.log() / math.log(max_distance / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return torch.where(a < exact, a, large) + future.long() * half


def check_relative(max_distance: int, num_buckets: int | None) -> None:
    """Validate ``max_distance`` (P) and ``num_buckets``; messages name the bad value."""
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1:
        raise ValueError(f"max_relative_position must be an int >= 1, got {max_distance!r}")
    if num_buckets is None:
        return
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 4 or num_buckets % 2:
        raise ValueError(f"relative_buckets must be None or an even int >= 4 (half for past, half for future "
                         f"offsets), got {num_buckets!r}")
    if max_distance <= num_buckets // 4:
        raise ValueError(f"max_relative_position ({max_distance}) must exceed relative_buckets // 4 "
                         f"({num_buckets // 4}), the distances that get exact buckets")


def num_relative_rows(max_distance: int, num_buckets: int | None = None) -> int:
    """Rows of ``R`` and ``b``: ``2 * max_distance`` when clipped, ``num_buckets`` when bucketed."""
    return 2 * max_distance if num_buckets is None else num_buckets


def relative_rows(delta: Tensor, *, max_distance: int, num_buckets: int | None = None) -> Tensor:
    """The row of ``R`` / ``b`` for each offset ``delta = query position - key position``.

    >>> relative_rows(torch.tensor([-5, -1, 0, 1, 3, 9]), max_distance=4)
    tensor([0, 3, 4, 5, 7, 7])
    """
    check_relative(max_distance, num_buckets)
    if num_buckets is None:
        return max_distance + delta.clamp(-max_distance, max_distance - 1)
    return relative_buckets(delta, num_buckets, max_distance)


def relative_index(q_len: int, k_len: int, *, max_distance: int, num_buckets: int | None = None,
                   causal: bool = False, device: torch.device | str | None = None) -> tuple[Tensor, slice]:
    """``(index (Tq, Tk), rows)`` for :func:`relative_logits`.

    Queries are end-aligned (query ``i`` at position ``k_len - q_len + i``). ``rows`` is the slice
    of ``R``'s rows the offsets in play use; ``index[i, j]`` is ``row(Δ) - rows.start``, or
    ``rows.stop - rows.start`` (the ``-inf`` column) for a future key when ``causal``.

    >>> index, rows = relative_index(2, 3, max_distance=4, causal=True)
    >>> index, rows
    (tensor([[1, 0, 3],
            [2, 1, 0]]), slice(4, 7, None))
    """
    if q_len < 1 or k_len < 1:
        raise ValueError(f"relative_index needs q_len, k_len >= 1, got {q_len}, {k_len}")
    # every offset, from the first query's latest key to the last query's first: i - j + (Tk - Tq)
    deltas = torch.arange(k_len - 1, -q_len, -1)  # Δ for (i - j + Tk - 1) = 0 .. Tq + Tk - 2, reversed
    table = relative_rows(deltas, max_distance=max_distance, num_buckets=num_buckets)
    live = deltas >= 0 if causal else torch.ones_like(deltas, dtype=torch.bool)
    used = table[live]
    start, stop = int(used.min()), int(used.max()) + 1
    table = torch.where(live, table - start, stop - start)  # the -inf column for blocked offsets
    # table[m] holds Δ = Tk - 1 - m; index[i, j] needs Δ = i - j + Tk - Tq, i.e. m = Tq - 1 - i + j
    index = table.to(device).unfold(0, k_len, 1).flip(0)  # (Tq, Tk)
    return index, slice(start, stop)


def relative_logits(q: Tensor, rel_key: Tensor, rel_bias: Tensor | None, index: Tensor, *,
                    rows: slice = slice(None), scale: float = 1.0) -> Tensor:
    """``(q_i · R[row] + b[row]) * scale`` for every query ``i`` and key ``j``, as ``(B, h, Tq, Tk)``.

    Args:
        q: ``(B, h, Tq, d)``.
        rel_key: ``R``, ``(n, h, d)``.
        rel_bias: ``b``, ``(n, h)``, or None.
        index: ``(Tq, Tk)`` (or broadcastable to ``(B, h, Tq, Tk)``) row numbers, counted from
            ``rows.start``; the value ``len(rows)`` gives ``-inf`` (a blocked position).
        rows: the rows of ``R`` / ``b`` the index refers to (from :func:`relative_index`).
        scale: multiplies the whole term (the attention's score scale).

    Example:
        >>> q, R, b = torch.randn(1, 2, 3, 4), torch.randn(8, 2, 4), torch.randn(8, 2)
        >>> index, rows = relative_index(3, 3, max_distance=4, causal=True)
        >>> out = relative_logits(q, R, b, index, rows=rows)
        >>> torch.allclose(out[0, 1, 2, 0], q[0, 1, 2] @ R[4 + 2, 1] + b[4 + 2, 1]), bool(out[0, 0, 0, 1].isinf())
        (True, True)
    """
    if q.dim() != 4:
        raise ValueError(f"q must have shape (batch, heads, seq, head_dim), got {tuple(q.shape)}")
    B, h, Tq, d = q.shape
    if rel_key.dim() != 3 or tuple(rel_key.shape[1:]) != (h, d):
        raise ValueError(f"rel_key must have shape (rows, heads, head_dim) = (n, {h}, {d}), got {tuple(rel_key.shape)}")
    if rel_bias is not None and tuple(rel_bias.shape) != tuple(rel_key.shape[:2]):
        raise ValueError(f"rel_bias must have shape {tuple(rel_key.shape[:2])}, got {tuple(rel_bias.shape)}")
    key = rel_key[rows]  # (W, h, d)
    W = key.size(0)
    # one extra zero row whose bias is -inf: the column blocked positions gather from
    key = torch.cat([key, key.new_zeros(1, h, d)])  # (W + 1, h, d)
    bias = rel_bias[rows] * scale if rel_bias is not None else q.new_zeros(W, h)
    bias = torch.cat([bias, bias.new_full((1, h), -math.inf)])  # (W + 1, h)
    scores = torch.matmul(q * scale, key.permute(1, 2, 0))  # (B, h, Tq, W + 1)
    scores = scores + bias.t()[:, None, :]
    return scores.gather(-1, index.expand(B, h, Tq, index.size(-1)))  # (B, h, Tq, Tk)


# -- the blocked path: logits by offset, skewed into place ---------------------------------------
def offset_rows(q_len: int, k_len: int, *, max_distance: int, num_buckets: int | None = None, causal: bool = False,
                device: torch.device | str | None = None) -> Tensor:
    """The row of ``R`` / ``b`` for each offset in play, latest key first: entry ``m`` is ``row(Tk - 1 - m)``.

    ``M = Tk`` entries when ``causal`` (offsets ``Tk - 1 .. 0``), else ``Tq + Tk - 1`` (down to
    ``-(Tq - 1)``). Query ``i`` (end-aligned) and key ``j`` have offset ``Tk - 1 - m`` for
    ``m = Tq - 1 - i + j``.

    >>> offset_rows(2, 3, max_distance=4)
    tensor([6, 5, 4, 3])
    """
    lowest = 0 if causal else 1 - q_len
    deltas = torch.arange(k_len - 1, lowest - 1, -1)
    return relative_rows(deltas, max_distance=max_distance, num_buckets=num_buckets).to(device)


def offset_keys(rel_key: Tensor, rel_bias: Tensor | None, rows: Tensor, *, scale: float = 1.0) -> Tensor:
    """``(h, d + 1, M)`` contiguous: column ``m`` is ``[R[rows[m]], b[rows[m]]] * scale`` for each head.

    A query with a trailing 1 (``(..., d + 1)``) times column ``m`` is ``(q · R + b) * scale``
    for that offset, so one matmul gives the bias as well (:func:`offset_logits`).
    """
    key = rel_key.index_select(0, rows)  # (M, h, d)
    bias = rel_bias.index_select(0, rows) if rel_bias is not None else key.new_zeros(key.shape[:2])  # (M, h)
    both = torch.cat([key, bias[..., None]], dim=-1)  # (M, h, d + 1)
    return (both.permute(1, 2, 0) * scale).contiguous()


def offset_logits(q1: Tensor, keys: Tensor, *, start: int, width: int, out: Tensor | None = None) -> Tensor:
    """``(B, h, Tq, width)``: column ``c`` is ``q1 · keys[:, :, start + c]``, ``-inf`` past the end of ``keys``.

    Args:
        q1: ``(B, h, Tq, d + 1)``, queries with a trailing 1.
        keys: ``(h, d + 1, M)`` from :func:`offset_keys`.
        start: the first column of ``keys`` used.
        width: columns of the result; those at ``start + c >= M`` hold ``-inf`` (blocked offsets).
        out: a contiguous ``(B, h, Tq, width)`` tensor to write into (not under autograd), or None.
    """
    B, h, n, _ = q1.shape
    valid = max(0, min(width, keys.size(-1) - start))
    part = keys[:, :, start:start + valid]
    if out is None:  # differentiable: a fresh tensor
        logits = torch.matmul(q1, part)
        if valid == width:
            return logits
        return torch.cat([logits, logits.new_full((B, h, n, width - valid), -math.inf)], dim=-1)
    for b in range(B):  # straight into the strided columns: a bmm per batch, no copy of keys
        torch.bmm(q1[b], part, out=out[b, :, :, :valid])
    out[..., valid:].fill_(-math.inf)
    return out


def skew(table: Tensor, k_len: int) -> Tensor:
    """The view ``(B, h, n, k_len)`` of a contiguous ``(B, h, n, W)`` table: ``[..., r, j] = table[..., r, n-1-r+j]``.

    Needs ``W >= n - 1 + k_len``. With ``table`` from :func:`offset_logits` (start ``Tq - e`` for
    queries ``s .. e-1``, ``n = e - s``, ``W = n - 1 + k_len``) row ``r`` is query ``s + r``
    and column ``j`` key ``j``: its entry has offset ``Tk - 1 - (Tq - 1 - (s + r) + j)``, as
    :func:`relative_logits` would gather. No copy: the rows overlap nothing (stride ``W - 1 >= k_len``).

    >>> skew(torch.arange(8.0).view(1, 1, 2, 4), 3)
    tensor([[[[1., 2., 3.],
              [4., 5., 6.]]]])
    """
    B, h, n, W = table.shape
    if W < n - 1 + k_len or not table.is_contiguous():
        raise ValueError(f"skew needs a contiguous table at least {n - 1 + k_len} wide, got {tuple(table.shape)}")
    return table.as_strided((B, h, n, k_len), (h * n * W, n * W, W - 1, 1), table.storage_offset() + n - 1)
