"""LongHeads: training-free per-head chunk routing, so a RoPE model reads past its trained length.

Paper: "LongHeads: Multi-Head Attention is Secretly a Long Context Processor", Lu et al., arXiv
2402.10685; official code LuLuLuyi/LongHeads (LLaMA only, batch 1, a per-token Python loop).
Method page: ``docs/methods/longheads.md``. The kernels and the algorithm are described in
:mod:`headmods.functional.longheads`; this layer adds the projections, the KV cache and the
per-sequence state (chunk representations, computed once per completed chunk).

Differences from the official code, on purpose:

- the query's own key is attended in prefill too (the official prefill leaves it out);
- GQA: chunks are chosen per key/value head from the mean of its query heads' chunk probabilities;
- ``selection="block"`` (default) chooses once per query block of ``chunk_size`` tokens, keeping
  for each chunk the highest probability any of the block's tokens gives it; this makes prefill
  cost linear in length with one SDPA call per block;
  ``selection="token"`` is the official per-token choice. Decoding a token at a time is per-token
  in both modes (a block's other queries are in the past), as the official decode is.

Requirements: rotary embeddings (``rope_theta``; a Hugging Face host's plain ``rope_theta`` is read
when swapping, scaled RoPE is refused), causal self-attention on unpadded batches, positions
``0, 1, ...`` continuing the cache. The cache holds *un-roped* keys, since LongHeads re-positions
them per query, and the sequence's selection state (:class:`LongHeadsState`, in the cache's
``layer_states``): one layer can decode several sequences in turn, each with its own cache.

Example:
    >>> attn = LongHeadsAttention(64, 4, chunk_size=8, attend_length=32, rope_theta=10000.0,
    ...                           batch_first=True).eval()
    >>> out, _ = attn(torch.randn(2, 100, 64), is_causal=True)  # 100 tokens, each head sees <= 32
    >>> out.shape
    torch.Size([2, 100, 64])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..functional.longheads import check_longheads, chunk_representations, longheads_attention
from ..cache import layer_state
from ..errors import CacheStateError
from ..functional.masks import AttentionMask
from ..registry import register_variant
from .base import CacheLike
from .config import AttentionConfig, host_rope
from .mha import MultiHeadAttention

__all__ = ["LongHeadsConfig", "LongHeadsAttention", "LongHeadsState", "SELECTIONS"]

SELECTIONS = ("block", "token")


@dataclass(frozen=True)
class LongHeadsConfig(AttentionConfig):
    """LongHeads settings on top of :class:`AttentionConfig` (``rope_theta`` is required).

    Attributes:
        chunk_size: tokens per chunk ``w`` (the official default is 256).
        attend_length: tokens each query attends to, ``K * w`` with ``K >= 3``; at most the
            model's trained length (official: 4096 for LLaMA-2).
        begin_selective_length: queries before this position use full attention; default
            ``attend_length``.
        selection: ``"block"`` (one choice per block of ``chunk_size`` queries) or ``"token"``.
        query_position: ``None`` (official) scores chunks with the un-roped query; an int ropes the
            query at that position for scoring (e.g. ``attend_length // 2``), see
            :func:`headmods.functional.longheads.chunk_scores`.
    """

    chunk_size: int = 256
    attend_length: int = 4096
    begin_selective_length: int | None = None
    selection: str = "block"
    query_position: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout:
            raise ValueError(f"LongHeads applies no attention dropout (it is a training-free inference method); "
                             f"got dropout={self.dropout!r}: use dropout=0.0")
        if self.rope_theta is None:
            raise ValueError("LongHeads re-positions keys with rotary embeddings; this layer has none "
                             "(rope_theta=None). It needs a RoPE model (LLaMA family), not BERT/GPT-2-style positions")
        if self.begin_selective_length is None:
            self._set("begin_selective_length", self.attend_length)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        check_longheads(self.chunk_size, self.attend_length, self.begin_selective_length, self.block)
        qp = self.query_position
        if qp is not None and (isinstance(qp, bool) or not isinstance(qp, int) or qp < 0):
            raise ValueError(f"query_position must be None or a non-negative int, got {qp!r}")
        if self.kv_map is not None:  # the kernels group query heads contiguously (h / h_kv per kv head)
            raise ValueError(f"LongHeads needs contiguous query-head groups per key/value head; got kv_map="
                             f"{self.kv_map} (e.g. from pruning heads unevenly). Prune whole groups, or use "
                             f"another variant")

    @property
    def block(self) -> int:
        return self.chunk_size if self.selection == "block" else 1


class LongHeadsState:
    """What selection needs of one sequence: the chunk representations of completed chunks and
    the un-roped queries of the chunk in progress."""

    def __init__(self) -> None:
        self.tokens = 0
        self.reps: Tensor | None = None  # (B, h, G, d)
        self.q_tail: Tensor | None = None  # (B, h, tokens - G * w, d)

    def update(self, q: Tensor, k: Tensor, v: Tensor, past: int, config: LongHeadsConfig) -> Tensor:
        """Add ``q`` (the queries after ``past`` tokens; ``k, v`` hold every key) and return the reps."""
        if past == 0:
            self.__init__()
        elif past != self.tokens or self.q_tail is None or self.q_tail.size(0) != q.size(0):
            raise CacheStateError(f"LongHeads: the cache holds {past} tokens but its selection state was built on "
                                  f"{self.tokens}; a cache follows one sequence: start each new sequence from an "
                                  "empty cache")
        w = config.chunk_size
        done = 0 if self.reps is None else self.reps.size(2)
        tail = q if self.q_tail is None else torch.cat([self.q_tail, q], dim=2)
        complete = k.size(2) // w
        if self.reps is None:
            self.reps = q.new_zeros(q.size(0), q.size(1), 0, q.size(3))
        if complete > done:
            span = slice(done * w, complete * w)
            new = chunk_representations(tail[:, :, :(complete - done) * w], k[:, :, span], v[:, :, span], w,
                                        config.rope_theta, config.scale)
            self.reps = torch.cat([self.reps, new], dim=2)
            tail = tail[:, :, (complete - done) * w:]
        self.q_tail = tail
        self.tokens = k.size(2)
        return self.reps


def longheads_core(q: Tensor, k: Tensor, v: Tensor, past: int, state: LongHeadsState,
                   config: LongHeadsConfig) -> Tensor:
    """Un-roped ``q (B, h, Tq, d)`` and all keys/values so far -> ``(B, h, Tq, d)`` (state updated)."""
    reps = state.update(q, k, v, past, config)
    return longheads_attention(q, k, v, reps, chunk_size=config.chunk_size, attend_length=config.attend_length,
                               begin=config.begin_selective_length, theta=config.rope_theta, q_start=past,
                               block=config.block, scale=config.scale,
                               query_position=config.query_position)


def check_mask(mask: AttentionMask) -> None:
    if not mask.causal:
        raise ValueError("LongHeads is causal self-attention; call it with is_causal=True")
    if mask.bias is not None:
        raise ValueError("LongHeads runs on unpadded batches with plain causal masks; got an extra mask "
                         "(padding or attn_mask). Run sequences of equal length, or one at a time")


@register_variant("longheads")
class LongHeadsAttention(MultiHeadAttention):
    """LongHeads on the layer contract (see the module docstring); arguments as :class:`HeadAttention`."""

    config_class = LongHeadsConfig

    @classmethod
    def host_settings(cls, module: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
        """Read the host's plain RoPE base when swapping (LongHeads applies RoPE itself)."""
        if settings.get("rope_theta") is None:
            settings = {**settings, "rope_theta": _host_rope_theta(module)}
        return settings

    def core(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *,
             rope: tuple[Tensor, Tensor] | None = None, cache: CacheLike | None = None,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        if need_weights:
            raise ValueError("LongHeads returns no attention weights (each head attends to its own chunks)")
        check_mask(mask)
        c = self.config
        B, Tq = query.size(0), query.size(1)
        if key.size(1) != Tq:
            raise ValueError("LongHeads is self-attention: key and query lengths must match")
        q, k, v = self.project_heads(query, key, value)  # un-roped
        past = 0 if cache is None else cache.seq_len
        if cache is not None:
            k, v = cache.update(k, v)  # un-roped keys: LongHeads places them anew for every query
        state = LongHeadsState() if cache is None else layer_state(cache, self, LongHeadsState)
        out = longheads_core(q, k, v, past, state, c)
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, c.num_heads * c.head_dim)), None


def _host_rope_theta(module: nn.Module) -> float:
    """The host's plain RoPE base; scaled RoPE and models without RoPE are refused."""
    theta, kind = host_rope(module)
    if kind != "default":
        raise ValueError(f"LongHeads applies plain RoPE itself; this model uses rope_type {kind!r}, which headmods "
                         "does not reproduce")
    if theta is None:
        raise ValueError(f"LongHeads needs rotary embeddings; {type(module).__name__} has no rope_theta in its config "
                         "(pass rope_theta=... to swap if the model uses plain RoPE)")
    return theta
