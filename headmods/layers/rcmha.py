"""RCMHA: relative convolutional multi-head attention (causal depthwise convs on q, k, v + relative logits).

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
Sugiharto, Aradea, Mubarok, arXiv 2308.03429 (2023); official code hermansh-id/rcmha (at 87df49b),
built on labml's Transformer-XL. Method page: ``docs/methods/rcmha.md``. Kernels:
:mod:`headmods.functional.relative`.

Two changes to MHA. A depthwise *causal* convolution over the sequence mixes each head channel
of the projected queries, keys and values with the ``K - 1`` tokens before it (Primer's
Multi-DConv-Head Attention, MDHA); and Transformer-XL-style learned relative terms join the
logits (RMHA). For query ``i``, key ``j`` and offset ``Δ = i - j``::

    q, k, v = DWConv_q(x W_Q), DWConv_k(x W_K), DWConv_v(x W_V)        # causal, kernel K (3)
    s_ij    = ((q_i + u) · k_j + q_i · R[Δ] + b[Δ]) * scale              # scale = 1/sqrt(d)
    y       = softmax(s + mask) v W_O

with ``u (h, d)`` a content bias, ``R (n, h, d)`` learned relative keys (not sinusoidal, unlike
Transformer-XL) and ``b (n, h)`` a learned relative bias, all zero at the start. It runs as SDPA
on ``q + u`` with the relative term (already scaled) and the caller's mask as one additive bias.
With more than one query the queries go in blocks (``query_blocks = 4`` or more, at most
``query_block = 256`` queries each; one block when attention weights are returned): each block's
bias ``(B, h, n, k_end)`` is a skewed view of ``q · R + b`` computed by offset into one reused
table (:func:`~headmods.functional.relative.skew`), and a causal block attends only to the keys
up to its last query, so the relative matmul and SDPA cover 62.5 % of the ``T²`` pairs with 4
blocks instead of all of them (SDPA cannot use its causal kernel together with a bias). One query
(decoding) gathers its term from ``q · Rᵀ`` (:func:`~headmods.functional.relative.relative_logits`).
Blocks with skewed views timed much faster than one gathered ``(B, h, T, T)`` bias; the layer's
time and memory against SDPA MHA are in ``benchmarks/results/rcmha_cpu.md`` (``benchmarks/bench_rcmha.py``).
The switches give the paper's ablations: ``conv`` only is MDHA, ``relative`` only is RMHA, both
is RCMHA, neither is MHA.

Official code facts and red flags (also in ``docs/methods/rcmha.md``):

- The released ``main.py`` builds its model with ``labml_nn.transformers.xl``'s stock
  ``RelativeMultiHeadAttention`` (no convolution), not the repository's RCMHA class: running the
  released script trains RMHA, and which module produced the paper's 0.572 accuracy is unclear.
- The official convolution has ``d`` channels applied to ``(B·h, d, T)``, so the same ``d``
  kernels serve every head (``conv_shared=True``, the default here); Primer's MDHA has one kernel
  per head channel (``conv_shared=False``).
- The released config trains with ``seq_len = 2`` (and ``mem_len = 32``), an unusual LM setting.
- Official ``P = 4096``: ``R`` alone holds ``2P·h·d = 8192·D`` parameters per layer (about 1M at
  D = 128, far more than the layer's ``4·D² = 65k``). The default here is ``P = 1024``
  (``2048·D``, still about 0.7 of the projections' ``4·D²`` at D = 768), and
  ``relative_buckets`` offers T5-style log buckets (e.g. 64 rows) instead.
- The official code has no bias on ``W_Q`` / ``W_K`` and one on ``W_V``; here ``bias`` is the
  usual :class:`AttentionConfig` setting (all or none).

Our choices:

- Offsets past ``P`` share the last row instead of failing (the official slicing breaks past
  ``P`` tokens); future offsets (non-causal use) have their own ``P`` rows. Row layout and buckets:
  :mod:`headmods.functional.relative`.
- ``conv_init="identity"`` (default): every convolution is the identity (last tap 1, others and the
  bias 0) and ``u = R = b = 0``, so the layer computes exactly what MHA with the same projections
  computes: the start for converting a checkpoint (``from_mha``, ``headmods.swap``), whose absolute
  positions (BERT, GPT-2) or RoPE (LLaMA) stay as they were. ``conv_init="official"``: PyTorch's default
  ``Conv1d`` initialization, ``U(-1/sqrt(K), 1/sqrt(K))`` for the kernels and their bias, and zero
  ``u, R, b``, as the official code trains from scratch.
- Order inside the layer: project, convolve, RoPE when the host or ``rope_theta`` gives it, cache,
  attend. ``u`` is added to the query *before* RoPE (so its term stays relative under RoPE) and
  ``q · R`` uses the un-rotated query (the relative term depends on content and offset only).
- Queries are aligned to the end of the keys, so with a KV cache query ``i`` sits at ``past + i``.
- GQA: the key and value convolutions act on the kv heads; per-head kernels are ``(h, d, K)`` for
  queries and ``(h_kv, d, K)`` for keys and values. ``R``, ``b`` and ``u`` are per query head.
- Padding: the convolution reads the tokens before each token whatever they are, so left padding
  leaks into the first real tokens of a trained (non-identity) convolution; right padding does not
  reach any real token. Relative offsets do not depend on padding.
- Transformer-XL segment memory: pass the previous segment's (detached) inputs in front of the
  current ones as key and value, ``layer(x, key=cat([mem, x]), value=cat([mem, x]), is_causal=True)``.
  Queries are end-aligned, so offsets and the causal mask cross the boundary; the key and value
  convolutions run over ``[mem; x]`` and the query convolution over ``x`` only, as in the official
  code (``q = DWConv(z W_Q)``, ``k = DWConv([mem; z] W_K)``). The layer keeps no memory itself.
  Incremental decoding uses a KV cache instead: the causal convolution then needs the last ``K - 1`` *pre-convolution* q, k and v of the sequence,
  which the cache keeps for the layer (:class:`RCMHAState`, in its ``layer_states``): each cache
  follows one sequence (batch), restarting whenever it is empty, and one layer can decode several
  sequences in turn, each with its own cache.
- ``prune_heads`` removes the pruned heads' ``u``, ``R``, ``b`` and per-head kernels too.

Shapes: B batch, T length, D embed_dim, h heads, h_kv kv heads, d head_dim, K conv_kernel,
n relative rows (``2P`` or ``relative_buckets``).

Example:
    >>> attn = RCMHAttention(64, 4, batch_first=True, max_relative_position=128, conv_init="official")
    >>> out, _ = attn(torch.randn(2, 10, 64), is_causal=True)
    >>> out.shape, attn.rel_key.shape, attn.q_conv.weight.shape
    (torch.Size([2, 10, 64]), torch.Size([256, 4, 16]), torch.Size([16, 3]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..cache import layer_state
from ..errors import CacheStateError
from ..functional.masks import AttentionMask
from ..functional.relative import (causal_depthwise_conv, check_relative, num_relative_rows, offset_keys,
                                   offset_logits, offset_rows, relative_index, relative_logits, skew)
from ..functional.rope import apply_rope
from ..registry import register_variant
from .base import CacheLike
from .config import AttentionConfig, _check_int
from .mha import MultiHeadAttention, _kept_groups, check_keep, slice_param

__all__ = ["RCMHAConfig", "RCMHAttention", "RCMHAState", "HeadConv", "INITS"]

INITS = ("identity", "official")


@dataclass(frozen=True)
class RCMHAConfig(AttentionConfig):
    """RCMHA settings on top of :class:`AttentionConfig`.

    Attributes:
        conv_kernel: taps K of the causal depthwise convolutions (official: 3).
        conv: convolve q, k and v (False: no convolution parameters; RMHA when ``relative``).
        conv_shared: one set of ``d`` kernels for all heads (official) or one per head (Primer MDHA).
        relative: add ``u``, ``R``, ``b`` (False: none of them; MDHA when ``conv``).
        max_relative_position: P. Clipped: ``2P`` rows, offsets beyond ``P - 1`` share a row;
            bucketed: the distance from which all offsets share the last bucket.
        relative_buckets: None for clipped offsets, or an even number of T5-style log buckets
            (the rows of ``R`` and ``b``), half for past and half for future offsets.
        conv_init: ``"identity"`` (equals MHA: identity convolutions, zero ``u, R, b``) or
            ``"official"`` (PyTorch's default convolution init, zero ``u, R, b``). Not called
            ``init``: ``headmods.swap`` already takes ``init`` ("copy" / "random").
    """

    conv_kernel: int = 3
    conv: bool = True
    conv_shared: bool = True
    relative: bool = True
    max_relative_position: int = 1024
    relative_buckets: int | None = None
    conv_init: str = "identity"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("conv_kernel", self.conv_kernel)
        for name in ("conv", "conv_shared", "relative"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_relative(self.max_relative_position, self.relative_buckets)
        if self.conv_init not in INITS:
            raise ValueError(f"conv_init must be one of {INITS}, got {self.conv_init!r}")

    @property
    def num_relative(self) -> int:
        """Rows of ``R`` and ``b``."""
        return num_relative_rows(self.max_relative_position, self.relative_buckets)


class HeadConv(nn.Module):
    """Causal depthwise convolution along the sequence of ``(B, heads, T, d)`` heads.

    ``weight (d, K)`` / ``bias (d,)`` shared by every head when ``heads`` is None, else
    ``(heads, d, K)`` / ``(heads, d)``; tap order as :func:`~headmods.functional.relative.causal_depthwise_conv`.
    """

    def __init__(self, heads: int | None, head_dim: int, kernel: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (head_dim,) if heads is None else (heads, head_dim)
        self.weight = nn.Parameter(torch.empty(*shape, kernel, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))

    @property
    def per_head(self) -> bool:
        return self.weight.dim() == 3

    def reset_parameters(self, init: str = "identity") -> None:
        """``"identity"``: last tap 1, the rest and the bias 0; ``"official"``: ``nn.Conv1d``'s default."""
        with torch.no_grad():
            if init == "identity":
                self.weight.zero_()[..., -1] = 1.0
                self.bias.zero_()
            else:  # kaiming_uniform_(a=sqrt(5)) on fan_in = K, and the bias, both reduce to U(-1/sqrt(K), 1/sqrt(K))
                bound = 1.0 / math.sqrt(self.weight.size(-1))
                self.weight.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor, prev: Tensor | None = None) -> Tensor:
        return causal_depthwise_conv(x, self.weight, self.bias, prev)

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep only ``heads`` of a per-head convolution (a shared one serves any heads)."""
        if not self.per_head:
            return
        index = torch.tensor(list(heads), device=self.weight.device)
        self.weight = slice_param(self.weight, 0, index)
        self.bias = slice_param(self.bias, 0, index)

    def extra_repr(self) -> str:
        heads = f"heads={self.weight.size(0)}" if self.per_head else "shared"
        return f"{heads}, head_dim={self.weight.size(-2)}, kernel={self.weight.size(-1)}"


class RCMHAState:
    """What the causal convolutions need of the sequence being decoded: the last ``K - 1``
    pre-convolution q, k and v, and how many tokens the layer has seen."""

    def __init__(self) -> None:
        self.tokens = 0
        self.q: Tensor | None = None  # (B, h, <= K-1, d)
        self.k: Tensor | None = None  # (B, h_kv, <= K-1, d)
        self.v: Tensor | None = None  # (B, h_kv, <= K-1, d)

    def previous(self, past: int, batch: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The tokens before a call that follows ``past`` cached tokens (None at the start)."""
        if past == 0:
            self.__init__()
            return None, None, None
        if past != self.tokens or self.k is None or self.k.size(0) != batch:
            seen = "no batch" if self.k is None else f"a batch of {self.k.size(0)}"
            raise CacheStateError(f"RCMHA: the cache holds {past} tokens but its convolution state was built on "
                                  f"{self.tokens} ({seen}; this call has a batch of {batch}); a cache follows one "
                                  "sequence: start each new sequence from an empty cache")
        return self.q, self.k, self.v

    def keep(self, q: Tensor, k: Tensor, v: Tensor, tokens: int, length: int) -> None:
        """Remember the last ``length`` of the pre-convolution ``q, k, v`` after ``tokens`` tokens in all."""
        def tail(old: Tensor | None, new: Tensor) -> Tensor:
            both = new if old is None or new.size(2) >= length else torch.cat([old, new], dim=2)
            return both[:, :, -length:].clone()  # a copy: do not keep the whole projection alive

        self.q, self.k, self.v = tail(self.q, q), tail(self.k, k), tail(self.v, v)
        self.tokens = tokens


@register_variant("rcmha")
class RCMHAttention(MultiHeadAttention):
    """Relative convolutional MHA (see the module docstring); arguments as :class:`HeadAttention`."""

    config_class = RCMHAConfig
    query_blocks = 4  # at least this many query blocks (fewer when there are fewer queries) ...
    query_block = 256  # ... and at most this many queries in a block

    def __init__(self, embed_dim: int, num_heads: int, *, device=None, dtype=None, **config: Any) -> None:
        super().__init__(embed_dim, num_heads, device=device, dtype=dtype, **config)
        c, dd = self.config, {"device": device, "dtype": dtype}
        if c.conv:
            shared = c.conv_shared
            self.q_conv = HeadConv(None if shared else c.num_heads, c.head_dim, c.conv_kernel, **dd)
            self.k_conv = HeadConv(None if shared else c.num_kv_heads, c.head_dim, c.conv_kernel, **dd)
            self.v_conv = HeadConv(None if shared else c.value_heads(), c.head_dim, c.conv_kernel, **dd)
        if c.relative:
            self.content_bias = nn.Parameter(torch.empty(c.num_heads, c.head_dim, **dd))  # u (h, d)
            self.rel_key = nn.Parameter(torch.empty(c.num_relative, c.num_heads, c.head_dim, **dd))  # R (n, h, d)
            self.rel_bias = nn.Parameter(torch.empty(c.num_relative, c.num_heads, **dd))  # b (n, h)
        self._index_memo: tuple[tuple, tuple[Tensor, slice]] | None = None
        self._rows_memo: tuple[tuple, Tensor] | None = None
        self._built = True
        self.reset_method_parameters()

    def reset_parameters(self) -> None:
        """Projections as ``nn.MultiheadAttention`` initializes them, RCMHA's parameters per ``config.conv_init``."""
        super().reset_parameters()
        if getattr(self, "_built", False):
            self.reset_method_parameters()

    def reset_method_parameters(self) -> None:
        """Convolutions per ``config.conv_init``; ``u``, ``R`` and ``b`` zero."""
        c = self.config
        if c.conv:
            for conv in (self.q_conv, self.k_conv, self.v_conv):
                conv.reset_parameters(c.conv_init)
        if c.relative:
            for p in (self.content_bias, self.rel_key, self.rel_bias):
                nn.init.zeros_(p)

    def extra_repr(self) -> str:
        c = self.config
        rel = (f"relative rows={c.num_relative} ({'buckets' if c.relative_buckets else 'clipped'}, "
               f"P={c.max_relative_position})" if c.relative else "relative=False")
        conv = f"conv_kernel={c.conv_kernel}, conv_shared={c.conv_shared}" if c.conv else "conv=False"
        return f"{super().extra_repr()}, {conv}, {rel}"

    # -- the method ----------------------------------------------------------------------------
    def core(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *,
             rope: tuple[Tensor, Tensor] | None = None, cache: CacheLike | None = None,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        c = self.config
        B, Tq = query.size(0), query.size(1)
        q, k, v = self.project_heads(query, key, value)  # (B, h, Tq, d), (B, h_kv, Tk, d) x 2
        if c.conv:
            q, k, v = self._convolve(q, k, v, cache)
        q_rel = q  # the relative term reads the un-rotated query
        if c.relative:
            q = q + self.content_bias[:, None]  # (B, h, Tq, d) + u (h, 1, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, h_kv, past + Tk, d)
        if c.relative and Tq > 1:
            out, weights = self._relative_attend(q, q_rel, k, v, mask, need_weights)
        else:
            if c.relative:
                mask = self._relative_mask(q_rel, k.size(2), mask)
            out, weights = self.attend_heads(q, k, v, mask, need_weights)
        out = out.transpose(1, 2).reshape(B, Tq, c.num_heads * c.head_dim)  # (B, Tq, h*d)
        return self.o_proj(out), weights

    def _convolve(self, q: Tensor, k: Tensor, v: Tensor, cache: CacheLike | None) -> tuple[Tensor, Tensor, Tensor]:
        """The causal convolutions, continuing the sequence from the cache's :class:`RCMHAState` when decoding."""
        K = self.config.conv_kernel
        decoding = cache is not None and K > 1
        prev_q, prev_k, prev_v = (None, None, None)
        if decoding:
            past = cache.seq_len
            state = layer_state(cache, self, RCMHAState)
            prev_q, prev_k, prev_v = state.previous(past, q.size(0))
        out = self.q_conv(q, prev_q), self.k_conv(k, prev_k), self.v_conv(v, prev_v)
        if decoding:
            state.keep(q, k, v, past + k.size(2), K - 1)
        return out

    def _relative_attend(self, q: Tensor, q_rel: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
                         need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Attention with the relative term, by blocks of queries (see the module docstring)."""
        c = self.config
        B, h, Tq, _ = q.shape
        Tk = k.size(2)
        memo = (Tq, Tk, mask.causal, q.device)
        if self._rows_memo is None or self._rows_memo[0] != memo:
            self._rows_memo = memo, offset_rows(Tq, Tk, max_distance=c.max_relative_position,
                                                num_buckets=c.relative_buckets, causal=mask.causal, device=q.device)
        scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.head_dim)
        keys = offset_keys(self.rel_key, self.rel_bias, self._rows_memo[1], scale=scale)  # (h, d + 1, M)
        q1 = torch.cat([q_rel, q_rel.new_ones(B, h, Tq, 1)], dim=-1)  # (B, h, Tq, d + 1)
        blocks = 1 if need_weights else max(min(self.query_blocks, Tq), -(-Tq // self.query_block))
        bounds = [round(i * Tq / blocks) for i in range(blocks + 1)]
        reuse = not (torch.is_grad_enabled() and (q1.requires_grad or keys.requires_grad))
        buffer = None
        if reuse:  # one table for every block, sized for the widest
            n = max(e - s for s, e in zip(bounds, bounds[1:]))
            buffer = q.new_empty(B * h * n * (n - 1 + Tk))
        outs, weights = [], None
        for s, e in zip(bounds, bounds[1:]):
            n = e - s
            k_end = Tk - Tq + e if mask.causal else Tk  # causal: keys after the block's last query are all blocked
            width = n - 1 + k_end
            table = buffer[:B * h * n * width].view(B, h, n, width) if reuse else None
            table = offset_logits(q1[:, :, s:e], keys, start=Tq - e, width=width, out=table)
            bias = skew(table, k_end)  # (B, h, n, k_end), -inf at future keys when causal
            if mask.bias is not None:
                extra = mask.bias[..., :k_end] if mask.bias.size(-2) == 1 else mask.bias[..., s:e, :k_end]
                extra = extra.to(bias.dtype)
                bias = bias.add_(extra) if reuse else bias + extra
            out, weights = self.attend_heads(q[:, :, s:e], k[:, :, :k_end], v[:, :, :k_end], AttentionMask(bias),
                                             need_weights)
            outs.append(out)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), weights

    def _relative_mask(self, q: Tensor, k_len: int, mask: AttentionMask) -> AttentionMask:
        """The caller's mask with the scaled relative term ``(q·R + b) * scale`` folded into its bias."""
        c = self.config
        key = (q.size(2), k_len, mask.causal, q.device)
        if self._index_memo is None or self._index_memo[0] != key:
            self._index_memo = key, relative_index(q.size(2), k_len, max_distance=c.max_relative_position,
                                                   num_buckets=c.relative_buckets, causal=mask.causal,
                                                   device=q.device)
        index, rows = self._index_memo[1]
        scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.head_dim)
        bias = relative_logits(q, self.rel_key, self.rel_bias, index, rows=rows, scale=scale)  # (B, h, Tq, Tk)
        if mask.bias is not None:
            bias = bias.add_(mask.bias.to(bias.dtype))
        return AttentionMask(bias)  # causality is in the bias (-inf where Δ < 0)

    # -- heads out -----------------------------------------------------------------------------
    def prune_heads(self, keep: Sequence[int]) -> "RCMHAttention":
        """Keep only query heads ``keep``, with their ``u``, ``R``, ``b`` and per-head kernels; returns ``self``.

        Example:
            >>> attn = RCMHAttention(64, 4, num_kv_heads=2, conv_shared=False, max_relative_position=8)
            >>> attn = attn.prune_heads([0, 3])
            >>> attn.rel_key.shape, attn.q_conv.weight.shape, attn.k_conv.weight.shape
            (torch.Size([16, 2, 16]), torch.Size([2, 16, 3]), torch.Size([2, 16, 3]))
        """
        c = self.config
        keep = check_keep(keep, c.num_heads)
        kept_k, _ = _kept_groups(c.query_to_kv(), keep)
        kept_v, _ = _kept_groups(c.query_to_value(), keep)
        super().prune_heads(keep)
        if c.conv:
            self.q_conv.keep_heads(keep)
            self.k_conv.keep_heads(kept_k)
            self.v_conv.keep_heads(kept_v)
        if c.relative:
            index = torch.tensor(keep, device=self.rel_key.device)
            self.content_bias = slice_param(self.content_bias, 0, index)
            self.rel_key = slice_param(self.rel_key, 1, index)
            self.rel_bias = slice_param(self.rel_bias, 1, index)
        return self
