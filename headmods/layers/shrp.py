"""SHRP-style expert attention: top-1 head routing per token, a shared expander, usage pruning.

Paper: "Specialized Head Routing and Pruning for Efficient Encoder Compression" (SHRP), Su,
Zhang, Zhang, Liu, Xu, Zhang, arXiv 2512.20635. Only the abstract is public and there is no
official code, so this is "SHRP-style, as implemented here" (``docs/methods/shrp.md``; the
decisions below are ours).

Each head is an expert. A router sends every token to one head (top-1); the layer outputs that
head's term of MHA plus a small shared *expander* FFN applied to the head's raw output:

    y_t = st(p_{t,i*}) * (o_{t,i*} W_O^{i*}) + E(o_{t,i*}) + b_O,   E(z) = W_2 gelu(W_1 z + b_1) + b_2

with ``p_t = softmax(x_t W_r / tau)``, ``i* = argmax p_t``. Decisions:

- ``st(p) = p / stop_grad(p)``: the forward value is 1 (a converted layer starts as "the chosen
  head's own MHA term"), the router still gets the Switch-style gradient through ``p``. Plain
  Switch scaling (value ``p``, about ``1/h`` at a uniform start) would shrink the converted
  function by ``h``.
- Start after conversion: ``W_r = 0`` plus N(0, 1e-3) noise to break ties, ``W_2 = 0`` and
  ``b_2 = 0``; so the converted layer computes, per token, exactly one head's MHA term (which
  head: argmax of the tiny random router) plus the output bias. Tested.
- Training computes every alive head and gathers the chosen one; eval computes only the alive
  heads (after pruning: the few that routing kept).
- Load balance ``h * sum_i P_i f_i`` weighted by ``balance_weight``, annealed linearly to 0 over
  the first ``balance_anneal`` of training; temperature annealed linearly from ``temperature`` to
  ``temperature_final`` (``set_progress(fraction)``; the recipes call it every step).
- Usage ``u_i`` = EMA of the fraction of tokens routed to head ``i`` (training and eval forwards);
  ``prune_by_usage(threshold | keep)`` keeps heads by usage and deletes the rest physically.
- "Layers pruned": ``contribution`` = EMA of ``||y|| / ||x||``; ``drop_attention()`` removes the
  whole attention sublayer (the layer then returns zeros, so the residual passes ``x``); the
  setting is part of the config, so checkpoints record and restore it.

Shapes: B batch, T tokens, D embed_dim, h alive heads, d head_dim, r expander ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.attend import attend
from ..functional.masks import AttentionMask
from ..functional.rope import apply_rope
from ..functional.routed import routed_attention
from ..registry import register_variant
from .base import CacheLike
from .config import AttentionConfig
from .mha import MultiHeadAttention, check_keep, project
from .usage import UsageEMA

__all__ = ["SHRPConfig", "SHRPAttention"]


@dataclass(frozen=True)
class SHRPConfig(AttentionConfig):
    """SHRP settings on top of :class:`AttentionConfig` (see the module docstring).

    Attributes:
        expander_ratio: hidden width of the expander, in head dims (``r``; 4).
        temperature / temperature_final: router softmax temperature, annealed linearly.
        balance_weight: weight of the load-balance loss at the start (0.01).
        balance_anneal: fraction of training over which that weight decays to 0 (0.3).
        usage_decay: EMA decay of usage and contribution statistics (0.99).
        router_noise: std of the router's initial weights (breaks top-1 ties; 1e-3).
        drop_attention: the attention sublayer is removed (the layer outputs zeros).
    """

    expander_ratio: int = 4
    temperature: float = 1.0
    temperature_final: float = 0.5
    balance_weight: float = 0.01
    balance_anneal: float = 0.3
    usage_decay: float = 0.99
    router_noise: float = 1e-3
    drop_attention: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.expander_ratio, bool) or not isinstance(self.expander_ratio, int) or self.expander_ratio < 1:
            raise ValueError(f"expander_ratio must be an int >= 1, got {self.expander_ratio!r}")
        for name in ("temperature", "temperature_final"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.balance_weight >= 0:
            raise ValueError(f"balance_weight must be >= 0, got {self.balance_weight!r}")
        for name in ("balance_anneal", "usage_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.num_kv_heads != self.num_heads and not self.drop_attention:
            raise ValueError(f"SHRP routes each token to one head with its own keys and values; num_kv_heads "
                             f"({self.num_kv_heads}) must equal num_heads ({self.num_heads})")


@register_variant("shrp")
class SHRPAttention(MultiHeadAttention):
    """SHRP-style expert attention on the headmods layer contract (see the module docstring)."""

    config_class = SHRPConfig

    def __init__(self, embed_dim: int, num_heads: int, *, device=None, dtype=None, **config: Any) -> None:
        super().__init__(embed_dim, num_heads, device=device, dtype=dtype, **config)
        c, dd = self.config, {"device": device, "dtype": dtype}
        self.router = nn.Linear(c.embed_dim, c.num_heads, bias=False, **dd)  # W_r
        hidden = c.expander_ratio * c.head_dim
        self.expander = nn.Sequential(nn.Linear(c.head_dim, hidden, **dd), nn.GELU(),
                                      nn.Linear(hidden, c.embed_dim, **dd))  # E: R^d -> R^D
        self.usage_ema = UsageEMA(c.num_heads, c.usage_decay, device=device)
        self.contribution_ema = UsageEMA((), c.usage_decay, device=device)
        self.progress = 0.0  # fraction of training done; drives the annealing
        self.reset_router()
        if c.drop_attention:
            self._remove_attention()

    @property
    def usage(self) -> Tensor:
        """Fraction of tokens routed to each head, averaged over forwards (bias-corrected EMA)."""
        return self.usage_ema.value()

    @property
    def contribution(self) -> Tensor:
        """Average ``||y|| / ||x||`` of this attention sublayer over forwards."""
        return self.contribution_ema.value()

    def reset_router(self) -> None:
        """The documented start: router N(0, router_noise), expander output layer zero."""
        nn.init.normal_(self.router.weight, std=self.config.router_noise)
        nn.init.zeros_(self.expander[2].weight)
        nn.init.zeros_(self.expander[2].bias)

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] for the temperature and load-balance schedules."""
        self.progress = min(max(float(fraction), 0.0), 1.0)

    @property
    def temperature(self) -> float:
        c = self.config
        return c.temperature + (c.temperature_final - c.temperature) * self.progress

    @property
    def balance_weight(self) -> float:
        c = self.config
        if c.balance_anneal == 0:
            return 0.0
        return c.balance_weight * max(0.0, 1.0 - self.progress / c.balance_anneal)

    # -- the method ----------------------------------------------------------------------------
    def core(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *,
             rope: tuple[Tensor, Tensor] | None = None, cache: CacheLike | None = None,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        c = self.config
        B, Tq = query.size(0), query.size(1)
        if c.drop_attention:
            self.aux_loss = None
            return query.new_zeros(B, Tq, c.embed_dim), None
        logits = self.router(query)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # routing decisions in at least float32
        probs = (logits / self.temperature).softmax(-1)  # (B, Tq, h)
        choice = probs.argmax(-1)  # (B, Tq) top-1 head per token
        if self._sparse(query, mask, need_weights):
            out = self._sparse_forward(query, key, value, mask, rope, cache, probs, choice)
            self._statistics(query, out, probs, choice)
            return out, None
        q, k, v = self.project_heads(query, key, value)  # (B, h, Tq, d), (B, h_kv, Tk, d) x 2
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)
        heads, weights = attend(q, k, v, mask, kv_map=c.kv_map, scale=c.scale, impl=c.impl,
                                dropout_p=c.dropout if self.training else 0.0, need_weights=need_weights)
        heads = heads.transpose(1, 2)  # (B, Tq, h, d)
        chosen = heads.gather(2, choice[:, :, None, None].expand(B, Tq, 1, c.head_dim))[:, :, 0]  # (B, Tq, d)
        p = probs.gather(-1, choice[..., None])  # (B, Tq, 1)
        st = (p / p.detach()).to(query.dtype)  # value 1, router gradient through p
        out = st * self._chosen_projection(heads, chosen, choice) + self.expander(chosen)
        if self.o_proj.bias is not None:
            out = out + self.o_proj.bias
        self._statistics(query, out, probs, choice)
        return out, weights

    def _sparse(self, query: Tensor, mask: AttentionMask, need_weights: bool) -> bool:
        """Only the chosen (token, head) pairs when no gradient is needed, no attention dropout applies
        and the mask is per key."""
        c = self.config
        if need_weights or c.impl not in ("auto", "sdpa") or torch.is_grad_enabled():
            return False
        if self.training and c.dropout > 0:
            return False  # the dense path applies dropout, as a training forward with gradients does
        return mask.bias is None or mask.bias.size(-2) == 1

    def _sparse_forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask,
                        rope: tuple[Tensor, Tensor] | None, cache: CacheLike | None, probs: Tensor,
                        choice: Tensor) -> Tensor:
        """Each token's chosen head only: :func:`routed_attention` with a one-hot gate, its output
        projection per head widened by the expander's first layer, ``[W_O^i ; W_1]``, so one pass
        yields both the head's MHA term and the expander's hidden pre-activation."""
        c = self.config
        B, Tq, Tk = query.size(0), query.size(1), key.size(1)
        k = project(key, self.k_proj).view(B, Tk, c.num_heads, c.head_dim).transpose(1, 2)  # (B, h, Tk, d)
        v = project(value, self.v_proj).view(B, Tk, c.num_heads, c.head_dim).transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)
        w1 = self.expander[0].weight  # (r d, d)
        w_o = self.o_proj.weight.view(c.embed_dim, c.num_heads, c.head_dim)
        wide = torch.cat([w_o, w1[:, None, :].expand(-1, c.num_heads, -1)], dim=0)  # (D + r d, h, d)
        gate = F.one_hot(choice, c.num_heads).to(query.dtype)  # (B, Tq, h): st(p) = 1 in value
        key_bias = None if mask.bias is None else mask.bias.expand(B, 1, 1, -1)
        z = routed_attention(query, self.q_proj.weight, self.q_proj.bias, wide.reshape(wide.size(0), -1), k, v,
                             list(range(c.num_heads)), gate, rope=rope, causal=mask.causal,
                             q_offset=k.size(2) - Tq, key_bias=key_bias, scale=c.scale)  # (B, Tq, D + r d)
        hidden = self.expander[1](z[..., c.embed_dim:] + self.expander[0].bias)
        out = z[..., :c.embed_dim] + self.expander[2](hidden)
        return out if self.o_proj.bias is None else out + self.o_proj.bias

    def _chosen_projection(self, heads: Tensor, chosen: Tensor, choice: Tensor) -> Tensor:
        """Each token's chosen head through that head's slice of W_O (no bias): ``(B, Tq, D)``."""
        c = self.config
        B, Tq = choice.shape
        if torch.is_grad_enabled():  # one dense matmul over the one-hot-masked heads (autograd-friendly)
            onehot = F.one_hot(choice, c.num_heads).to(heads.dtype)[..., None]  # (B, Tq, h, 1)
            return F.linear((heads * onehot).reshape(B, Tq, c.num_heads * c.head_dim), self.o_proj.weight)
        flat, rows = chosen.reshape(B * Tq, c.head_dim), choice.reshape(-1)
        out = chosen.new_zeros(B * Tq, c.embed_dim)
        w_o = self.o_proj.weight
        for i in range(c.num_heads):  # per head: only its tokens
            idx = (rows == i).nonzero().squeeze(1)
            if idx.numel():
                out.index_add_(0, idx, flat.index_select(0, idx) @ w_o[:, i * c.head_dim:(i + 1) * c.head_dim].t())
        return out.view(B, Tq, c.embed_dim)

    def _statistics(self, x: Tensor, y: Tensor, probs: Tensor, choice: Tensor) -> None:
        h = self.config.num_heads
        f = F.one_hot(choice, h).flatten(0, -2).to(probs.dtype).mean(0)  # (h,) fraction of tokens per head
        self.usage_ema.update(f)
        with torch.no_grad():
            self.contribution_ema.update((y.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)).mean().float())
        weight = self.balance_weight if self.training else 0.0
        self.aux_loss = weight * h * (probs.flatten(0, -2).mean(0) * f).sum() if weight else None

    # -- pruning -------------------------------------------------------------------------------
    def prune_by_usage(self, threshold: float | None = None, *, keep: int | None = None,
                       allow_drop: bool = False) -> "SHRPAttention":
        """Keep heads with usage >= ``threshold`` (a fraction of tokens, in [0, 1]) or the ``keep``
        most used; the rest are deleted physically. With no head left the layer's attention is
        dropped if ``allow_drop``, otherwise that is an error."""
        c = self.config
        if (threshold is None) == (keep is None):
            raise ValueError("give exactly one of threshold (usage fraction) or keep (a head count)")
        usage = self.usage.tolist()
        if threshold is not None:
            if not 0 <= threshold <= 1:
                raise ValueError(f"threshold must be a usage fraction in [0, 1], got {threshold!r}")
            heads = [i for i, u in enumerate(usage) if u >= threshold]
        else:
            if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= c.num_heads:
                raise ValueError(f"keep must be an int in [0, num_heads={c.num_heads}], got {keep!r}")
            heads = sorted(sorted(range(c.num_heads), key=lambda i: (-usage[i], i))[:keep])
        if not heads:
            if not allow_drop:
                raise ValueError(f"pruning would leave no head (usage {['%.3g' % u for u in usage]}); pass "
                                 "allow_drop=True to drop this layer's attention entirely")
            return self.drop_attention()
        return self.prune_heads(heads)

    def prune_heads(self, keep: Sequence[int]) -> "SHRPAttention":
        keep = check_keep(keep, self.config.num_heads)
        super().prune_heads(keep)
        with torch.no_grad():
            new = nn.Linear(self.router.in_features, len(keep), bias=False, device=self.router.weight.device,
                            dtype=self.router.weight.dtype)
            new.weight.copy_(self.router.weight[keep])
        self.router = new
        self.usage_ema.keep(keep)
        return self

    def drop_attention(self) -> "SHRPAttention":
        """Remove the attention sublayer: the layer returns zeros (the host's residual passes x)."""
        self._config = self.config.replace(drop_attention=True)
        self._remove_attention()
        return self

    def _remove_attention(self) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "router", "expander"):
            if hasattr(self, name):
                delattr(self, name)
            setattr(self, name, None)
