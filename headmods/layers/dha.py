"""DHA: decoupled-head attention, with key and value heads grouped independently per layer.

Paper: "Learning Decoupled-Head Attention from Transformer Checkpoints via Adaptive Heads
Fusion", Chen et al., arXiv 2406.06567 (NeurIPS 2024). Method page: ``docs/methods/dha.md``. No
official code exists; the conversion that finds the groups lives in :mod:`headmods.convert.dha`.

Every query head stays. Keys have ``n_k`` heads and values ``n_v`` heads, and query head ``i``
reads key head ``k_map[i]`` and value head ``v_map[i]``::

    O_i = softmax(Q_i K_{k_map(i)}^T / sqrt(d) + M) V_{v_map(i)},   y = concat_i(O_i) W_O

The maps need not be contiguous and need not agree: that is what "decoupled" means, and why a
stock GQA kernel (one contiguous grouping shared by K and V) cannot run it. The KV cache holds
only the ``n_k`` key and ``n_v`` value heads, and attention never expands them to ``h`` heads:
decoding groups the queries by key head for scores and by value head for values
(:func:`headmods.functional.decoupled.decoupled_attend`); prefill and training attend over the
distinct (key head, value head) pairs, a transient that is at most ``h`` heads of ``(T, d)``.

Config: the key side is :class:`AttentionConfig`'s ``num_kv_heads`` / ``kv_map`` (so a DHA layer
whose values follow its keys is exactly GQA); ``num_v_heads`` / ``v_map`` add the value side.
With ``from_mha`` and the defaults (every head its own group) the layer equals the source.

Shapes: B batch, T tokens, D embed_dim, h query heads, n_k key heads, n_v value heads, d head_dim.

Example:
    >>> attn = DHAAttention(64, 4, num_kv_heads=2, kv_map=(0, 1, 1, 0), num_v_heads=3, v_map=(0, 1, 2, 2),
    ...                     batch_first=True, rope_theta=10000.0)
    >>> out, _ = attn(torch.randn(2, 5, 64), is_causal=True)
    >>> out.shape, attn.k_proj.out_features, attn.v_proj.out_features
    (torch.Size([2, 5, 64]), 32, 48)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..functional.attend import check_kv_map
from ..functional.decoupled import decoupled_attend
from ..functional.masks import AttentionMask
from ..registry import register_variant
from .config import AttentionConfig, _check_int
from .mha import MultiHeadAttention

__all__ = ["DHAConfig", "DHAAttention"]


@dataclass(frozen=True)
class DHAConfig(AttentionConfig):
    """DHA settings on top of :class:`AttentionConfig`.

    The key heads are ``num_kv_heads`` with query -> key map ``kv_map`` (aliases ``num_k_heads``,
    ``k_map``). Attributes:
        num_v_heads: value heads n_v; None: the same as the key heads (and ``v_map`` then defaults
            to the key map: plain GQA).
        v_map: query head -> value head; None: contiguous groups of ``num_heads // num_v_heads``.
    """

    num_v_heads: int | None = None
    v_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_v_heads is None:
            self._set("num_v_heads", self.num_kv_heads)
            if self.v_map is None:
                self._set("v_map", self.kv_map)
        _check_int("num_v_heads", self.num_v_heads)
        if self.v_map is None:
            if self.num_heads % self.num_v_heads:
                raise ValueError(f"num_v_heads ({self.num_v_heads}) must divide num_heads ({self.num_heads}), "
                                 "or give v_map explicitly")
        else:
            self._set("v_map", tuple(int(j) for j in self.v_map))
            check_kv_map(self.v_map, self.num_heads, self.num_v_heads, name="v_map", heads="value heads")
            if self.v_map == _contiguous(self.num_heads, self.num_v_heads):
                self._set("v_map", None)

    @property
    def num_k_heads(self) -> int:
        return self.num_kv_heads

    @property
    def k_map(self) -> tuple[int, ...]:
        return self.query_to_kv()

    def value_heads(self) -> int:
        return self.num_v_heads

    def query_to_value(self) -> tuple[int, ...]:
        return self.v_map if self.v_map is not None else _contiguous(self.num_heads, self.num_v_heads)

    def is_gqa(self) -> bool:
        """True when values share the keys' grouping and it is contiguous and uniform (stock GQA)."""
        return self.kv_map is None and self.num_v_heads == self.num_kv_heads and self.v_map is None

    def kv_fraction(self) -> float:
        """Cached heads relative to MHA: ``(n_k + n_v) / (2 h)``."""
        return (self.num_kv_heads + self.num_v_heads) / (2 * self.num_heads)


def _check_partition(groups: Sequence[Sequence[int]], num: int, name: str, heads: str) -> dict[int, int]:
    """Head -> group index for a partition of ``range(num)``; raises naming what is wrong."""
    members = [int(i) for g in groups for i in g]
    if any(len(g) == 0 for g in groups) or sorted(members) != list(range(num)):
        raise ValueError(f"{name} must split the {num} {heads} 0..{num - 1} into non-empty groups, each head "
                         f"once, got {[list(g) for g in groups]}")
    return {int(i): j for j, g in enumerate(groups) for i in g}


def _mean_rows(linear: nn.Linear, groups: Sequence[Sequence[int]], head_dim: int) -> nn.Linear:
    """A new projection with one head per group: the mean of the group's head rows."""
    weight = linear.weight.detach().view(-1, head_dim, linear.in_features)
    bias = None if linear.bias is None else linear.bias.detach().view(-1, head_dim)
    new = nn.Linear(linear.in_features, len(groups) * head_dim, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for j, g in enumerate(groups):
            index = torch.tensor(list(g), device=weight.device)
            new.weight[j * head_dim:(j + 1) * head_dim] = weight.index_select(0, index).mean(dim=0)
            if bias is not None:
                new.bias[j * head_dim:(j + 1) * head_dim] = bias.index_select(0, index).mean(dim=0)
    new.requires_grad_(linear.weight.requires_grad)
    return new


def _contiguous(num_heads: int, groups: int) -> tuple[int, ...] | None:
    if num_heads % groups:
        return None
    size = num_heads // groups
    return tuple(i // size for i in range(num_heads))


@register_variant("dha")
class DHAAttention(MultiHeadAttention):
    """Decoupled-head attention (see the module docstring); arguments as :class:`HeadAttention`."""

    config_class = DHAConfig

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
                     need_weights: bool) -> tuple[Tensor, Tensor | None]:
        c = self.config
        return decoupled_attend(q, k, v, mask, k_map=c.k_map, v_map=c.query_to_value(), scale=c.scale,
                                impl=c.impl, dropout_p=c.dropout if self.training else 0.0,
                                need_weights=need_weights)

    def _value_changes(self, num_value_heads: int, value_map: tuple[int, ...]) -> dict[str, Any]:
        return {"num_v_heads": num_value_heads, "v_map": value_map}

    def regroup(self, k_groups: Sequence[Sequence[int]], v_groups: Sequence[Sequence[int]]) -> "DHAAttention":
        """Merge key heads and value heads by groups; returns ``self``.

        ``k_groups`` partitions the current key heads, ``v_groups`` the current value heads. Each
        group becomes one head whose projection rows are the mean of its members' rows (exact
        when the members agree, as after fusion); the query -> key/value maps follow. This is
        DHA's collapse step, and with K and V groups equal and contiguous it is GQA mean-pooling.
        Parameters are replaced: rebuild any optimizer afterwards.

        Example:
            >>> attn = DHAAttention(64, 4).regroup([[0, 1], [2, 3]], [[0], [1, 2, 3]])
            >>> attn.config.k_map, attn.config.query_to_value()
            ((0, 0, 1, 1), (0, 1, 1, 1))
        """
        c = self.config
        k_of = _check_partition(k_groups, c.num_kv_heads, "k_groups", "key heads")
        v_of = _check_partition(v_groups, c.num_v_heads, "v_groups", "value heads")
        self.k_proj = _mean_rows(self.k_proj, k_groups, c.head_dim)
        self.v_proj = _mean_rows(self.v_proj, v_groups, c.head_dim)
        self._config = c.replace(num_kv_heads=len(k_groups), kv_map=tuple(k_of[j] for j in c.k_map),
                                 num_v_heads=len(v_groups), v_map=tuple(v_of[j] for j in c.query_to_value()))
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, num_v_heads={c.num_v_heads}, k_map={c.k_map}, "
                f"v_map={c.query_to_value()}")

    def as_mha(self) -> MultiHeadAttention:
        """The same function as a plain GQA :class:`MultiHeadAttention`, when the structure allows.

        Allowed when keys and values share one grouping of equal-size groups; non-contiguous
        groups are made contiguous by reordering the query heads (rows of ``q_proj``, columns of
        ``o_proj``), which leaves the function unchanged. Anything else raises, saying why.
        """
        c = self.config
        if c.k_map != c.query_to_value():
            raise ValueError(f"keys and values are grouped differently (k_map={c.k_map}, v_map={c.query_to_value()}); "
                             "only a shared grouping is GQA")
        sizes = {c.k_map.count(j) for j in range(c.num_kv_heads)}
        if len(sizes) > 1:
            raise ValueError(f"key/value groups have unequal sizes {sorted(sizes)} (k_map={c.k_map}); GQA needs "
                             "equal groups")
        order = sorted(range(c.num_heads), key=lambda i: (c.k_map[i], i))
        d = c.head_dim
        rows = torch.tensor([i * d + r for i in order for r in range(d)], device=self.q_proj.weight.device)
        fields = {k: v for k, v in c.to_dict().items() if k in AttentionConfig.__dataclass_fields__}
        fields.update(kv_map=None, kept_heads=None)
        mha = MultiHeadAttention.from_config(AttentionConfig.from_dict(fields), device=rows.device,
                                             dtype=self.q_proj.weight.dtype)
        with torch.no_grad():
            mha.q_proj.weight.copy_(self.q_proj.weight.index_select(0, rows))
            mha.o_proj.weight.copy_(self.o_proj.weight.index_select(1, rows))
            mha.k_proj.load_state_dict(self.k_proj.state_dict())
            mha.v_proj.load_state_dict(self.v_proj.state_dict())
            if self.q_proj.bias is not None:
                mha.q_proj.bias.copy_(self.q_proj.bias.index_select(0, rows))
            if self.o_proj.bias is not None:
                mha.o_proj.bias.copy_(self.o_proj.bias)
        return mha.train(self.training)
