"""MoH: Mixture-of-Head attention that really computes fewer heads.

Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention", Jin, Zhu, Yuan, Yan,
arXiv 2410.11842 (ICML 2025). Method page: ``docs/methods/moh.md``.

MHA is a sum of per-head terms ``sum_i H_i W_O^i``. MoH makes it a weighted, sparse sum: the
first ``shared_heads`` heads are always on, each token picks ``active_routed`` (K) of the other
``h_r = h - shared_heads`` heads, and head outputs are scaled by gates before ``W_O``
(:mod:`headmods.layers.moh_router`: ``router="learned"`` as in the official ViT/DiT code,
``router="qnorm"`` as in the released MoH-LLaMA3). Training adds ``aux_weight * L_b``
(load balance) in ``self.aux_loss``.

Execution. The official code computes every head and masks afterwards, which saves nothing.
Here, whenever no gradient is needed (``execution="auto"``), only routed (token, head) pairs
are computed: shared heads densely, routed queries gathered per head, attended and scattered
back through their slice of ``W_O`` (:func:`headmods.functional.routed.routed_attention`;
causal queries are processed in position blocks so they never pay for the masked triangle).
Training (and ``need_weights``, per-query masks, eager/flex kernels) uses the dense masked path;
the two are tested equal. ``execution="dense"`` forces the official-style path.

Keys and values are computed and cached for *every* kv head: a later token may route to a head
an earlier token skipped (SkyworkAI/MoH#7), so MoH does not shrink the KV cache. With GQA,
routing acts on query heads only.

Deviations from the official code, on purpose: the qnorm router divides by ``std + eps``
(the official code divides by a std that can be 0); the router of a post-LN host (BERT) reads the
attention input; aux losses live on the layer, not in a class-level list.

Shapes: B batch, T query tokens, Tk keys, D embed_dim, h heads (h_s shared first, then h_r
routed), d head_dim, K active routed heads per token.

Example:
    >>> attn = MoHAttention(256, 8, shared_heads=2, active_routed=3, batch_first=True).eval()
    >>> out, _ = attn(torch.randn(2, 10, 256), is_causal=True)
    >>> out.shape, attn.last_usage.shape
    (torch.Size([2, 10, 256]), torch.Size([6]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional.attend import attend
from ..functional.masks import AttentionMask
from ..functional.rope import apply_rope
from ..functional.routed import routed_attention
from ..registry import register_variant
from .base import CacheLike, Projections
from .config import AttentionConfig
from .mha import MultiHeadAttention, project
from .moh_router import MoHRouter, Routing
from .usage import UsageEMA

__all__ = ["MoHConfig", "MoHAttention"]

ROUTERS = ("learned", "qnorm")
EXECUTIONS = ("auto", "dense", "sparse")


@dataclass(frozen=True)
class MoHConfig(AttentionConfig):
    """MoH settings on top of :class:`AttentionConfig`.

    Attributes:
        shared_heads: always-on heads h_s (heads ``0 .. h_s-1``).
        active_routed: K routed heads per token; default half of the routed heads (at least 1).
            ``K = h - h_s`` with zero routers is exactly MHA.
        router: ``"learned"`` (official ViT/DiT) or ``"qnorm"`` (MoH-LLaMA3, parameter-free).
        router_init: ``"normal"`` (W_r ~ N(0, 0.02)) or ``"zero"``; W_s and W_h always start at 0.
        aux_weight: beta of the load-balance loss (0.01 in the official code).
        usage_decay: EMA decay of the per-head usage statistics.
        execution: ``"auto"`` (sparse when no gradient is needed), ``"dense"`` or ``"sparse"``.
    """

    shared_heads: int = 2
    active_routed: int | None = None
    router: str = "learned"
    router_init: str = "normal"
    aux_weight: float = 0.01
    usage_decay: float = 0.99
    execution: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        h, h_s = self.num_heads, self.shared_heads
        if isinstance(h_s, bool) or not isinstance(h_s, int) or not 0 <= h_s <= h:
            raise ValueError(f"shared_heads must be an int in [0, num_heads={h}], got {h_s!r}")
        if self.active_routed is None:
            self._set("active_routed", max(1, (h - h_s) // 2) if h > h_s else 0)
        K = self.active_routed
        if isinstance(K, bool) or not isinstance(K, int) or K < 0:
            raise ValueError(f"active_routed must be an int >= 0, got {K!r}")
        if h_s + K > h:
            raise ValueError(f"shared_heads + active_routed ({h_s} + {K}) exceeds num_heads ({h})")
        if K == 0 and h_s == 0:
            raise ValueError("active_routed=0 with shared_heads=0 leaves no head active")
        for name, value, allowed in (("router", self.router, ROUTERS), ("router_init", self.router_init,
                                     ("normal", "zero")), ("execution", self.execution, EXECUTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not self.aux_weight >= 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight!r}")
        if not 0 <= self.usage_decay < 1:
            raise ValueError(f"usage_decay must be in [0, 1), got {self.usage_decay!r}")

    @property
    def routed_heads(self) -> int:
        return self.num_heads - self.shared_heads


@register_variant("moh")
class MoHAttention(MultiHeadAttention):
    """Mixture-of-Head attention on the headmods layer contract (see the module docstring)."""

    config_class = MoHConfig

    def __init__(self, embed_dim: int, num_heads: int, *, device=None, dtype=None, **config: Any) -> None:
        super().__init__(embed_dim, num_heads, device=device, dtype=dtype, **config)
        c = self.config
        self.router = MoHRouter(c.embed_dim, c.shared_heads, c.routed_heads, c.active_routed, c.router,
                                init=c.router_init, device=device, dtype=dtype)
        self.usage_ema = UsageEMA(c.routed_heads, c.usage_decay, device=device)
        self.last_usage: Tensor = torch.zeros(c.routed_heads, device=device)  # f_i of the last forward

    @property
    def usage(self) -> Tensor:
        """Fraction of tokens routed to each routed head, averaged over forwards (bias-corrected EMA)."""
        return self.usage_ema.value()

    # -- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_projections(cls, weights: Projections, embed_dim: int, num_heads: int, *,
                         shared_index: Sequence[int] | None = None, **config: Any) -> "MoHAttention":
        """Build from MHA/GQA projections; ``shared_index`` names the heads to keep always on.

        The chosen heads move to the front (heads are reordered: q rows and o columns, and k/v
        rows when every head has its own kv head; with GQA the kv heads stay and ``kv_map``
        records who reads what). By default the first ``shared_heads`` heads are shared (the
        paper's choice). Router weights start as documented in :class:`MoHRouter`.
        """
        if shared_index is not None:
            weights, config = _reorder_heads(weights, embed_dim, num_heads, list(shared_index), config)
        return super().from_projections(weights, embed_dim, num_heads, **config)

    # -- the method ----------------------------------------------------------------------------
    def core(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *,
             rope: tuple[Tensor, Tensor] | None = None, cache: CacheLike | None = None,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        c = self.config
        B, Tq, Tk = query.size(0), query.size(1), key.size(1)
        k = project(key, self.k_proj).view(B, Tk, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, h_kv, Tk, d)
        v = project(value, self.v_proj).view(B, Tk, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, h_kv, Tk, d)
        if rope is not None:
            k = apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # every kv head is cached: later tokens may route anywhere
        if self._sparse(query, mask, need_weights):
            out = self._sparse_forward(query, k, v, mask, rope)
            return out, None
        q = project(query, self.q_proj).view(B, Tq, c.num_heads, c.head_dim)  # (B, Tq, h, d), pre-RoPE
        routing = self._route(query, q[:, :, c.shared_heads:])
        q = q.transpose(1, 2)  # (B, h, Tq, d)
        if rope is not None:
            q = apply_rope(q, *rope)
        heads, weights = attend(q, k, v, mask, kv_map=c.kv_map, scale=c.scale, impl=c.impl,
                                dropout_p=c.dropout if self.training else 0.0, need_weights=need_weights)
        gated = heads.transpose(1, 2) * routing.gates[..., None]  # (B, Tq, h, d)
        return self.o_proj(gated.reshape(B, Tq, c.num_heads * c.head_dim)), weights

    def _sparse(self, query: Tensor, mask: AttentionMask, need_weights: bool) -> bool:
        c = self.config
        if c.execution != "auto":
            return c.execution == "sparse"
        if need_weights or c.impl not in ("auto", "sdpa") or (self.training and c.dropout > 0):
            return False
        if mask.bias is not None and mask.bias.size(-2) != 1:
            return False  # per-query masks: dense path
        grad = torch.is_grad_enabled() and (query.requires_grad or any(p.requires_grad for p in self.parameters()))
        return not grad

    def _route(self, x: Tensor, routed_queries: Tensor | None) -> Routing:
        routing = self.router(x, routed_queries if self.config.router == "qnorm" else None)
        if routing.select is not None:
            with torch.no_grad():
                f = routing.select.flatten(0, -2).float().mean(0)  # (h_r,) fraction of tokens per head
                self.last_usage = f
                self.usage_ema.update(f)
        balance = routing.load_balance() if self.training else None
        self.aux_loss = None if balance is None else self.config.aux_weight * balance
        return routing

    def _sparse_forward(self, x: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
                        rope: tuple[Tensor, Tensor] | None) -> Tensor:
        c = self.config
        B, Tq = x.size(0), x.size(1)
        h_s, d = c.shared_heads, c.head_dim
        wq, bq = self.q_proj.weight, self.q_proj.bias
        wo = self.o_proj.weight
        routed_q = None
        if c.router == "qnorm" and c.active_routed > 0:
            routed_q = F.linear(x, wq[h_s * d:], None if bq is None else bq[h_s * d:])
            routed_q = routed_q.view(B, Tq, c.routed_heads, d)  # (B, Tq, h_r, d) pre-RoPE: the router's scores
        routing = self._route(x, routed_q)
        to_kv = c.query_to_kv()
        bo = self.o_proj.bias
        if h_s:
            q = F.linear(x, wq[:h_s * d], None if bq is None else bq[:h_s * d])
            q = q.view(B, Tq, h_s, d).transpose(1, 2)  # (B, h_s, Tq, d)
            if rope is not None:
                q = apply_rope(q, *rope)
            k_s, v_s, kv_map = _kv_subset(k, v, to_kv[:h_s])
            heads, _ = attend(q, k_s, v_s, mask, kv_map=kv_map, scale=c.scale)
            gated = heads.transpose(1, 2) * routing.gates[..., :h_s, None]  # (B, Tq, h_s, d)
            out = F.linear(gated.reshape(B, Tq, h_s * d), wo[:, :h_s * d], bo)  # (B, Tq, D)
        else:
            out = x.new_zeros(B, Tq, wo.size(0)) if bo is None else bo.expand(B, Tq, -1).contiguous()
        if c.active_routed:
            key_bias = mask.bias if mask.bias is None else mask.bias.expand(B, 1, 1, -1)
            routed_attention(  # adds the selected pairs' rows into out, in place
                x, wq[h_s * d:], None if bq is None else bq[h_s * d:], wo[:, h_s * d:], k, v, to_kv[h_s:],
                routing.gates[..., h_s:], queries=routed_q, rope=rope, causal=mask.causal,
                q_offset=k.size(2) - Tq, key_bias=key_bias, scale=c.scale, add_to=out)
        return out

    # -- heads out -----------------------------------------------------------------------------
    def prune_heads(self, keep: Sequence[int]) -> "MoHAttention":
        """Keep query heads ``keep`` (shared and routed alike); routers and usage follow."""
        from .mha import check_keep

        c = self.config
        keep = check_keep(keep, c.num_heads)
        shared_keep = [i for i in keep if i < c.shared_heads]
        routed_keep = [i - c.shared_heads for i in keep if i >= c.shared_heads]
        active = min(c.active_routed, len(routed_keep))
        if active == 0 and not shared_keep:
            raise ValueError(f"keeping heads {keep} leaves no head active (no shared head, no routed head)")
        super().prune_heads(keep)
        self.router.keep(shared_keep, routed_keep, active)
        self.usage_ema.keep(routed_keep)
        self.last_usage = self.last_usage[routed_keep].clone()
        return self

    def _pruned_config(self, keep: list[int], **changes: Any) -> MoHConfig:
        c = self.config
        shared = sum(1 for i in keep if i < c.shared_heads)
        routed = len(keep) - shared
        return c.replace(shared_heads=shared, active_routed=min(c.active_routed, routed), **changes)

    def prune_unused(self, min_usage: float) -> "MoHAttention":
        """Drop routed heads whose usage EMA is below ``min_usage`` (shared heads stay)."""
        c = self.config
        keep = list(range(c.shared_heads)) + [c.shared_heads + i for i, u in enumerate(self.usage.tolist())
                                              if u >= min_usage]
        return self.prune_heads(keep)


def _kv_subset(k: Tensor, v: Tensor, kv_of_head: Sequence[int]) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
    """K/V of the kv heads some query heads read (a view when they are contiguous), and the map into them."""
    used = sorted(set(kv_of_head))
    if used == list(range(used[0], used[-1] + 1)):
        k, v = k[:, used[0]:used[-1] + 1], v[:, used[0]:used[-1] + 1]
    else:
        index = torch.tensor(used, device=k.device)
        k, v = k.index_select(1, index), v.index_select(1, index)
    kv_map = tuple(used.index(j) for j in kv_of_head)
    return k, v, kv_map


def _reorder_heads(weights: Projections, embed_dim: int, num_heads: int, shared: list[int],
                   config: dict[str, Any]) -> tuple[Projections, dict[str, Any]]:
    if len(set(shared)) != len(shared) or any(not 0 <= i < num_heads for i in shared):
        raise ValueError(f"shared_index must list distinct heads in [0, {num_heads}), got {shared}")
    config = {**config, "shared_heads": config.get("shared_heads", len(shared))}
    if config["shared_heads"] != len(shared):
        raise ValueError(f"shared_index names {len(shared)} heads but shared_heads={config['shared_heads']}")
    order = shared + [i for i in range(num_heads) if i not in shared]
    d = weights.q_weight.size(0) // num_heads
    rows = torch.tensor([i * d + j for i in order for j in range(d)], device=weights.q_weight.device)
    num_kv = weights.k_weight.size(0) // d
    q_w, q_b = weights.q_weight.index_select(0, rows), None if weights.q_bias is None else weights.q_bias[rows]
    o_w = weights.o_weight.index_select(1, rows)
    k_w, k_b, v_w, v_b = weights.k_weight, weights.k_bias, weights.v_weight, weights.v_bias
    if num_kv == num_heads and config.get("kv_map") is None:
        k_w, v_w = k_w.index_select(0, rows), v_w.index_select(0, rows)
        k_b = None if k_b is None else k_b[rows]
        v_b = None if v_b is None else v_b[rows]
    else:
        group = num_heads // num_kv
        to_kv = config.get("kv_map") or [i // group for i in range(num_heads)]
        config["kv_map"] = tuple(to_kv[i] for i in order)
        config["num_kv_heads"] = num_kv
    return Projections(q_w, k_w, v_w, o_w, q_b, k_b, v_b, weights.o_bias), config
