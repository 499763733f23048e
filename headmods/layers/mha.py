"""Multi-head attention with grouped keys/values (MHA, GQA, MQA), optional RoPE and KV cache.

This is the reference every head-structured variant reduces to: with ``from_mha`` it computes
exactly what ``nn.MultiheadAttention`` computes, and the variants' function-preserving starts
are tested against it.

- GQA/MQA: ``num_kv_heads`` key/value heads serve ``num_heads`` query heads; they are never
  expanded in memory (:func:`headmods.functional.attend`). A ``kv_map`` allows any
  query-head -> kv-head assignment, which is what non-uniform GQA pruning leaves behind.
- Projections are four ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``): the
  layout of Hugging Face LLaMA, so conversion and export are renames, and pruning slices rows.
- ``prune_heads(keep)`` removes query heads physically, and with them kv heads no query head
  reads any more.

Shapes: B batch, T length, D embed_dim, h heads, h_kv kv heads, d head_dim.

Example:
    >>> attn = MultiHeadAttention(768, 12, num_kv_heads=4, batch_first=True, rope_theta=10000.0)
    >>> x = torch.randn(2, 16, 768)
    >>> out, _ = attn(x, is_causal=True)
    >>> out.shape
    torch.Size([2, 16, 768])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..functional.attend import attend
from ..functional.masks import AttentionMask
from ..functional.rope import apply_rope
from ..registry import register_variant
from .base import CacheLike, HeadAttention, Projections

__all__ = ["MultiHeadAttention"]


def project(x: Tensor, linear: nn.Linear) -> Tensor:
    """``linear(x)`` for ``(B, T, D)`` x that may be a seq-first tensor seen batch-first.

    Applying the projection in the storage layout and transposing the result back avoids the
    copy ``F.linear`` would make of a transposed input.
    """
    if not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return linear(x.transpose(0, 1)).transpose(0, 1)
    return linear(x)


@register_variant("mha")
class MultiHeadAttention(HeadAttention):
    """MHA / GQA / MQA on the headmods layer contract (see :class:`HeadAttention` for arguments)."""

    def __init__(self, embed_dim: int, num_heads: int, *, device=None, dtype=None, **config) -> None:
        super().__init__(embed_dim, num_heads, device=device, dtype=dtype, **config)
        c, dd = self.config, {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(c.embed_dim, c.num_heads * c.head_dim, bias=c.bias, **dd)
        self.k_proj = nn.Linear(c.kdim, c.num_kv_heads * c.head_dim, bias=c.bias, **dd)
        self.v_proj = nn.Linear(c.vdim, c.value_heads() * c.head_dim, bias=c.bias, **dd)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.embed_dim, bias=c.out_bias, **dd)
        self.reset_parameters()

    @property
    def out_proj(self) -> nn.Linear:
        """``nn.MultiheadAttention``'s name for the output projection (the module is ``o_proj``)."""
        return self.o_proj

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, as ``nn.MultiheadAttention`` initializes them."""
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def core(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *,
             rope: tuple[Tensor, Tensor] | None = None, cache: CacheLike | None = None,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        c = self.config
        B, Tq = query.size(0), query.size(1)
        q, k, v = self.project_heads(query, key, value)
        q, k = self.place_heads(q, k, rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, h_kv, past + Tk, d)
        out, weights = self.attend_heads(q, k, v, mask, need_weights)
        out = out.transpose(1, 2).reshape(B, Tq, c.num_heads * c.head_dim)  # (B, Tq, h*d)
        return self.o_proj(out), weights

    def project_heads(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, D)`` inputs -> heads ``q (B, h, Tq, d)``, ``k (B, h_kv, Tk, d)``, ``v (B, h_v, Tk, d)``."""
        c = self.config
        B, Tq, Tk = query.size(0), query.size(1), key.size(1)
        q = project(query, self.q_proj).view(B, Tq, c.num_heads, c.head_dim).transpose(1, 2)
        k = project(key, self.k_proj).view(B, Tk, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = project(value, self.v_proj).view(B, Tk, c.value_heads(), c.head_dim).transpose(1, 2)
        return q, k, v

    def place_heads(self, q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Positions on projected heads before caching: RoPE when given (variants that transform q, k override it)."""
        if rope is None:
            return q, k
        return apply_rope(q, *rope), apply_rope(k, *rope)

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
                     need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """The attention kernel on projected heads (variants with other head maps override it)."""
        c = self.config
        return attend(q, k, v, mask, kv_map=c.kv_map, scale=c.scale, impl=c.impl,
                      dropout_p=c.dropout if self.training else 0.0, need_weights=need_weights)

    # -- weights in, heads out -----------------------------------------------------------------
    def load_projections(self, weights: Projections) -> None:
        """Copy projection weights (``nn.Linear`` layout); shapes must match this layer's heads."""
        pairs = ((self.q_proj, weights.q_weight, weights.q_bias), (self.k_proj, weights.k_weight, weights.k_bias),
                 (self.v_proj, weights.v_weight, weights.v_bias), (self.o_proj, weights.o_weight, weights.o_bias))
        for linear, weight, bias in pairs:  # check all before copying any: nothing half-loaded
            if tuple(weight.shape) != tuple(linear.weight.shape):
                raise ValueError(f"projection weight of shape {tuple(weight.shape)} does not fit {linear} "
                                 f"(expects {tuple(linear.weight.shape)}; num_heads={self.num_heads}, "
                                 f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim})")
            if (bias is None) != (linear.bias is None):
                raise ValueError(f"bias presence differs: weights have {'no ' if bias is None else ''}bias, "
                                 f"the layer has bias={linear.bias is not None}")
        with torch.no_grad():
            for linear, weight, bias in pairs:
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)

    def prune_heads(self, keep: Sequence[int]) -> "MultiHeadAttention":
        """Keep only query heads ``keep`` (indices into the current heads); returns ``self``.

        Kv heads that no kept query head reads are removed too. When the kept heads leave
        unequal groups, the layer records the query-head -> kv-head map in ``config.kv_map``.
        Parameters are replaced by smaller ones: rebuild any optimizer afterwards.

        Example:
            >>> attn = MultiHeadAttention(64, 8, num_kv_heads=4).prune_heads([0, 1, 4])
            >>> attn.num_heads, attn.num_kv_heads, attn.config.kv_map
            (3, 2, (0, 0, 1))
        """
        c = self.config
        keep = check_keep(keep, c.num_heads)
        kept_k, new_k_map = _kept_groups(c.query_to_kv(), keep)
        kept_v, new_v_map = _kept_groups(c.query_to_value(), keep)
        d = c.head_dim
        original = c.kept_heads or tuple(range(c.num_heads))
        # the new config first: a variant that refuses the result does so before any weight changes
        config = self._pruned_config(keep, num_heads=len(keep), num_kv_heads=len(kept_k), head_dim=d,
                                     kv_map=new_k_map, kept_heads=tuple(original[i] for i in keep),
                                     **self._value_changes(len(kept_v), new_v_map))
        q_rows = head_rows(keep, d, self.q_proj.weight.device)
        self.q_proj = slice_linear(self.q_proj, rows=q_rows)
        self.k_proj = slice_linear(self.k_proj, rows=head_rows(kept_k, d, self.k_proj.weight.device))
        self.v_proj = slice_linear(self.v_proj, rows=head_rows(kept_v, d, self.v_proj.weight.device))
        self.o_proj = slice_linear(self.o_proj, cols=q_rows)
        self._config = config
        return self

    def _pruned_config(self, keep: list[int], **changes):
        """The config after keeping query heads ``keep``; variants with per-head settings extend it."""
        return self.config.replace(**changes)

    def _value_changes(self, num_value_heads: int, value_map: tuple[int, ...]) -> dict:
        """Config changes for the value heads left by pruning: none here, values follow keys (DHA: its own)."""
        return {}


def _kept_groups(head_map: tuple[int, ...], keep: list[int]) -> tuple[list[int], tuple[int, ...]]:
    """The kv heads the kept query heads read, and the kept heads' map renumbered onto them."""
    kept = sorted({head_map[i] for i in keep})
    return kept, tuple(kept.index(head_map[i]) for i in keep)


def check_keep(keep: Sequence[int], num_heads: int) -> list[int]:
    if isinstance(keep, Tensor):
        keep = keep.tolist()
    keep = list(keep)
    if not keep:
        raise ValueError("prune_heads needs at least one head to keep, got none")
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_heads for i in keep):
        raise ValueError(f"heads to keep must be ints in [0, {num_heads}), got {keep}")
    if len(set(keep)) != len(keep):
        raise ValueError(f"heads to keep must be distinct, got {keep}")
    return sorted(keep)


def head_rows(heads: Sequence[int], head_dim: int, device: torch.device) -> Tensor:
    """Row indices of ``heads`` in a ``(heads * head_dim, ...)`` projection."""
    return (torch.tensor(heads, device=device)[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()


def slice_linear(linear: nn.Linear, *, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the selected output rows / input columns of ``linear``."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    new = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def slice_param(param: nn.Parameter, dim: int, index: Tensor | Sequence[int]) -> nn.Parameter:
    """A new parameter holding the entries ``index`` of ``param`` along ``dim`` (``requires_grad`` kept)."""
    index = torch.as_tensor(index, device=param.device)
    return nn.Parameter(param.detach().index_select(dim, index).clone(), requires_grad=param.requires_grad)
