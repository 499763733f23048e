"""The attention kernel dispatch: ``sdpa`` | ``eager`` | ``flex``, with grouped keys and values.

``attend(q, k, v, mask)`` takes query heads ``h`` and key/value heads ``h_kv`` and never
expands K/V to ``h`` heads in memory:

- ``kv_map=None``: contiguous groups, query head ``i`` reads kv head ``i // (h // h_kv)``
  (MHA when ``h_kv == h``, GQA, MQA). SDPA runs with ``enable_gqa``; the eager path folds each
  group's queries into one matmul against its kv head.
- ``kv_map=(j_0, ..., j_{h-1})``: any query-head -> kv-head map (pruned GQA, DHA). Query heads
  are reordered so each kv head's queries are adjacent; equal-size groups then run as one
  grouped call, unequal ones as one call per kv head. Only queries move, never keys or values.

Backends:

- ``"sdpa"``: ``F.scaled_dot_product_attention``; the default (``"auto"``).
- ``"eager"``: explicit ``softmax(q k^T * scale + bias) v``; the reference, and the only one
  that returns attention weights (``"auto"`` picks it when ``need_weights=True``).
- ``"flex"``: ``torch.nn.attention.flex_attention``. On CPU it has no backward in torch 2.13
  (pytorch#148752), so it is refused when gradients are required; no dropout.

A query row with nothing to attend to gives a zero output in every backend, never NaN.

Shapes: ``q (B, h, Tq, d)``, ``k (B, h_kv, Tk, d)``, ``v (B, h_kv, Tk, dv)``,
``out (B, h, Tq, dv)``, ``weights (B, h, Tq, Tk)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import AttentionMask

__all__ = ["IMPLS", "attend", "resolve_impl", "check_kv_map"]

IMPLS = ("auto", "sdpa", "eager", "flex")

Core = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool], "tuple[Tensor, Tensor | None]"]


def resolve_impl(impl: str, need_weights: bool = False) -> str:
    """The backend that runs: ``"auto"`` is ``"sdpa"``, or ``"eager"`` when weights are requested."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "eager" if need_weights else "sdpa"
    if need_weights and impl != "eager":
        raise ValueError(f"need_weights=True needs the eager backend (impl='eager' or 'auto'), got impl={impl!r}")
    return impl


def check_kv_map(kv_map: Sequence[int], num_heads: int, num_kv_heads: int, *, name: str = "kv_map",
                 heads: str = "kv heads") -> None:
    """Validate a query-head -> kv-head map: one entry per query head, every kv head used."""
    if len(kv_map) != num_heads:
        raise ValueError(f"{name} needs one entry per query head ({num_heads}), got {len(kv_map)}")
    if any(not 0 <= j < num_kv_heads for j in kv_map):
        raise ValueError(f"{name} entries must lie in [0, {num_kv_heads}) (there are {num_kv_heads} {heads}), "
                         f"got {tuple(kv_map)}")
    unused = sorted(set(range(num_kv_heads)) - set(kv_map))
    if unused:
        raise ValueError(f"{name} leaves {heads} {unused} unused; every one needs a query head, got {tuple(kv_map)}")


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask | None = None,
    *,
    kv_map: Sequence[int] | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention over (possibly grouped) heads.

    Args:
        q, k, v: ``(B, h, Tq, d)``, ``(B, h_kv, Tk, d)``, ``(B, h_kv, Tk, dv)``.
        mask: internal mask (:mod:`headmods.functional.masks`); None attends everywhere.
        kv_map: query head -> kv head; None means contiguous groups.
        scale: score scale, ``1/sqrt(d)`` by default.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
        impl: ``"auto" | "sdpa" | "eager" | "flex"``.
        need_weights: also return the ``(B, h, Tq, Tk)`` probabilities (eager only).

    Returns:
        ``(out (B, h, Tq, dv), weights or None)``.

    Example:
        >>> q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
        >>> out, _ = attend(q, k, v, AttentionMask(causal=True))  # GQA, 4 query heads per kv head
        >>> out.shape
        torch.Size([2, 8, 5, 16])
    """
    _check_qkv(q, k, v)
    impl = resolve_impl(impl, need_weights)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    mask = mask or AttentionMask()
    q_len, k_len = q.size(2), k.size(2)
    if impl == "sdpa":
        bias, is_causal = mask.for_sdpa(q_len, k_len, dtype=q.dtype, device=q.device)
        if bias is not None and bias.is_cuda and not bias.is_contiguous():
            # CUDA's half-precision SDPA kernels fail on masks with arbitrary strides (a strided view
            # such as RCMHA's skewed relative bias gave "misaligned address" on an H200)
            bias = bias.contiguous()

        def core(q_, k_, v_, bias_, causal_):
            out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias_, dropout_p=dropout_p,
                                                 is_causal=causal_, scale=scale,
                                                 enable_gqa=q_.size(1) != k_.size(1))
            return out, None
    elif impl == "eager":
        bias, is_causal = mask.materialize(q_len, k_len, dtype=q.dtype, device=q.device), False

        def core(q_, k_, v_, bias_, causal_):
            return _eager(q_, k_, v_, bias_, scale, dropout_p)
    else:
        _check_flex(q, k, v, dropout_p)
        bias, is_causal = mask.materialize(q_len, k_len, dtype=q.dtype, device=q.device), False

        def core(q_, k_, v_, bias_, causal_):
            return _flex(q_, k_, v_, bias_, scale), None

    if kv_map is None:
        if q.size(1) % k.size(1):
            raise ValueError(f"query heads ({q.size(1)}) must be a multiple of kv heads ({k.size(1)}) "
                             "when no kv_map is given")
        return core(q, k, v, bias, is_causal)
    check_kv_map(kv_map, q.size(1), k.size(1))
    return _by_kv_head(core, q, k, v, bias, is_causal, tuple(int(j) for j in kv_map))


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}")
    if not (q.size(0) == k.size(0) == v.size(0)):
        raise ValueError(f"q, k, v batch sizes differ: {q.size(0)}, {k.size(0)}, {v.size(0)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (batch, heads, seq), got {tuple(k.shape[:3])} and {tuple(v.shape[:3])}")
    if q.size(-1) != k.size(-1):
        raise ValueError(f"q and k head_dim differ: {q.size(-1)} vs {k.size(-1)}")


def _heads(t: Tensor | None, index: Tensor | slice) -> Tensor | None:
    """Pick query heads of a per-head tensor; head-broadcast (size-1) tensors pass through."""
    if t is None or t.size(1) == 1:
        return t
    return t[:, index] if isinstance(index, slice) else t.index_select(1, index)


def _by_kv_head(core: Core, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool,
                kv_map: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """Run ``core`` with each kv head's query heads adjacent, then restore the query-head order."""
    groups = [[i for i, j in enumerate(kv_map) if j == g] for g in range(k.size(1))]
    order = [i for group in groups for i in group]
    uniform = len({len(group) for group in groups}) == 1
    if uniform and order == list(range(q.size(1))):
        return core(q, k, v, bias, is_causal)  # already contiguous groups
    index = torch.tensor(order, device=q.device)
    q, bias = q.index_select(1, index), _heads(bias, index)  # queries move; keys and values stay
    if uniform:
        out, weights = core(q, k, v, bias, is_causal)
    else:  # unequal groups: one call per kv head
        parts, start = [], 0
        for g, group in enumerate(groups):
            heads = slice(start, start + len(group))
            parts.append(core(q[:, heads], k[:, g:g + 1], v[:, g:g + 1], _heads(bias, heads), is_causal))
            start += len(group)
        out = torch.cat([o for o, _ in parts], dim=1)
        weights = None if parts[0][1] is None else torch.cat([w for _, w in parts], dim=1)
    inverse = torch.argsort(index)
    return out.index_select(1, inverse), _heads(weights, inverse)


def _eager(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
           dropout_p: float) -> tuple[Tensor, Tensor]:
    """Reference attention; each kv head's query heads share one matmul (no K/V expansion)."""
    B, h, Tq, d = q.shape
    h_kv, Tk = k.size(1), k.size(2)
    g = h // h_kv
    scores = torch.matmul(q.reshape(B, h_kv, g * Tq, d), k.transpose(-1, -2))  # (B, h_kv, g*Tq, Tk)
    scores = scores.view(B, h, Tq, Tk) * scale
    dead = None
    if bias is not None:
        scores = scores + bias
        dead = torch.isneginf(bias).all(dim=-1, keepdim=True)  # rows with no key: (B|1, h|1, Tq, 1)
        if dead.any():
            scores = scores.masked_fill(dead, 0.0)
        else:
            dead = None
    low_precision = q.dtype in (torch.float16, torch.bfloat16)  # softmax in float32 for those
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32 if low_precision else None).to(q.dtype)
    if dead is not None:
        weights = weights.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.matmul(weights.view(B, h_kv, g * Tq, Tk), v)  # (B, h_kv, g*Tq, dv)
    return out.view(B, h, Tq, v.size(-1)), weights


def _check_flex(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ValueError(f"impl='flex' has no attention dropout; got dropout_p={dropout_p} (use 'sdpa' or 'eager')")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and q.device.type == "cpu":
        raise NotImplementedError(
            "impl='flex' has no backward on CPU in this torch (FlexAttention does not support backward "
            "on CPU, pytorch#148752); run it under torch.no_grad() or use impl='sdpa' for training")


def _flex(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if bias is not None:
        full = bias.expand(q.size(0), q.size(1), q.size(2), k.size(2))  # a view: no copy

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + full[b, h, q_idx, kv_idx]
    return flex_attention(q, k, v, score_mod=score_mod, scale=scale, enable_gqa=q.size(1) != k.size(1))
