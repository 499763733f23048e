"""MoH routing: gates for shared and routed heads, and the load-balance loss.

Two routers (``headmods/layers/moh.py`` explains the method):

- ``"learned"`` (MoH-ViT / MoH-DiT official code): routed gates ``r = renorm(topK(softmax(x W_r))) * K``,
  shared gates ``s = softmax(x W_s) * h_s`` (``s = 1`` when ``h_s == 1``), group weights
  ``a = softmax(x W_h) * 2``, gates ``g = [a_0 s, a_1 r]``. The ``*K``, ``*h_s`` and ``*2`` factors
  are the code's; the paper's equation omits them. They make every gate about 1 at a near-uniform
  start, which is what lets an MHA checkpoint convert sanely.
- ``"qnorm"`` (MoH-LLaMA3 inference code): no parameters; routed head ``i``'s score is the L2 norm
  of its pre-RoPE query, divided by the per-token standard deviation across routed heads (population
  std; an eps guards std = 0, which the official code does not), softmax, top-K; gates are binary.

Load balance (learned router, training only): ``L_b = h_r * sum_i P_i f_i`` with ``P_i`` the mean
router probability and ``f_i`` the fraction of tokens routed to head ``i`` over all tokens of the
batch (padding included, as in the official code); ``L_b = K`` at a uniform router.

Shapes: B batch, T tokens, D width, h_s shared heads, h_r routed heads, K active routed heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Routing", "MoHRouter"]

EPS = 1e-6


@dataclass
class Routing:
    """One forward's routing: ``gates (B, T, h_s + h_r)`` (0 for unselected routed heads),
    ``select (B, T, h_r)`` bool, ``probs (B, T, h_r)`` router probabilities (None without routing)."""

    gates: Tensor
    select: Tensor | None
    probs: Tensor | None

    def load_balance(self) -> Tensor | None:
        """``h_r * sum_i P_i f_i`` over every token of the batch."""
        if self.probs is None:
            return None
        h_r = self.probs.size(-1)
        P = self.probs.flatten(0, -2).mean(0)  # (h_r,)
        f = self.select.flatten(0, -2).float().mean(0)  # (h_r,)
        return h_r * (P * f).sum()


class MoHRouter(nn.Module):
    """Computes MoH gates from the attention input (learned) or the routed queries' norms (qnorm)."""

    def __init__(self, embed_dim: int, shared: int, routed: int, active: int, kind: str, *,
                 init: str = "normal", device=None, dtype=None) -> None:
        super().__init__()
        self.shared_heads, self.routed_heads, self.active, self.kind, self.init = shared, routed, active, kind, init
        dd = {"device": device, "dtype": dtype, "bias": False}
        learned = kind == "learned"
        self.routed = nn.Linear(embed_dim, routed, **dd) if learned and active > 0 else None  # W_r
        self.shared = nn.Linear(embed_dim, shared, **dd) if learned and shared > 1 else None  # W_s
        self.mix = nn.Linear(embed_dim, 2, **dd) if learned and shared > 0 and active > 0 else None  # W_h
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_s and W_h start at zero (shared gates exactly 1); W_r at N(0, 0.02), or zero with
        ``init="zero"`` (with K = h_r the layer then equals MHA exactly)."""
        for linear in (self.shared, self.mix):
            if linear is not None:
                nn.init.zeros_(linear.weight)
        if self.routed is not None:
            if self.init == "zero":
                nn.init.zeros_(self.routed.weight)
            else:
                nn.init.normal_(self.routed.weight, std=0.02)

    def forward(self, x: Tensor, routed_queries: Tensor | None = None) -> Routing:
        """Gates for ``x (B, T, D)``; the qnorm router needs ``routed_queries (B, T, h_r, d)`` (pre-RoPE)."""
        B, T = x.shape[:2]
        h_s, K = self.shared_heads, self.active
        select = probs = routed = None
        if K > 0:
            if self.kind == "learned":
                logits = self.routed(x).float()  # (B, T, h_r)
            else:
                if routed_queries is None:
                    raise ValueError("the qnorm router needs the routed heads' queries")
                z = routed_queries.float().norm(dim=-1)  # (B, T, h_r)
                logits = z / (z.std(dim=-1, correction=0, keepdim=True) + EPS)
            probs = logits.softmax(dim=-1)  # (B, T, h_r)
            top = probs.topk(K, dim=-1).indices
            select = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)  # (B, T, h_r)
            if self.kind == "learned":
                kept = probs * select
                routed = kept / kept.sum(-1, keepdim=True).clamp_min(EPS) * K
            else:
                routed = select.float()
        if self.kind == "qnorm" or h_s == 0:
            shared = x.new_ones(B, T, h_s, dtype=torch.float32)
            gates = shared if routed is None else torch.cat([shared, routed], dim=-1)
        else:
            shared = self.shared(x).float().softmax(-1) * h_s if self.shared is not None else \
                x.new_ones(B, T, h_s, dtype=torch.float32)
            if routed is None:
                gates = shared  # K == 0: all heads shared
            else:
                a = self.mix(x).float().softmax(-1) * 2  # (B, T, 2)
                gates = torch.cat([a[..., :1] * shared, a[..., 1:] * routed], dim=-1)
        return Routing(gates.to(x.dtype), select, probs if self.kind == "learned" else None)

    def keep(self, shared_keep: list[int], routed_keep: list[int], active: int) -> None:
        """Restrict the router to the kept heads (indices within the shared / routed groups)."""
        def rows(linear: nn.Linear | None, idx: list[int]) -> nn.Linear | None:
            if linear is None or not idx:
                return None
            new = nn.Linear(linear.in_features, len(idx), bias=False, device=linear.weight.device,
                            dtype=linear.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(linear.weight[idx])
            return new

        self.shared_heads, self.routed_heads, self.active = len(shared_keep), len(routed_keep), active
        self.routed = rows(self.routed, routed_keep) if active > 0 else None
        self.shared = rows(self.shared, shared_keep) if len(shared_keep) > 1 else None
        if not (self.shared_heads > 0 and active > 0):
            self.mix = None
