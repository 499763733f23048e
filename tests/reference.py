"""Independent naive references for the tests: explicit loops, float64, nothing from headmods."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def naive_attention(q, k, v, kv_of_head, *, blocked=None, bias=None, scale=None):
    """Per (batch, head, query) loop.

    q (B, h, Tq, d); k, v (B, h_kv, Tk, d); kv_of_head[i] is query head i's kv head.
    blocked: bool (B, h, Tq, Tk), True = may not attend. bias: float (B, h, Tq, Tk), added.
    A query with no allowed key outputs zeros. Returns out (B, h, Tq, dv), weights (B, h, Tq, Tk).
    """
    q, k, v = (t.detach().double() for t in (q, k, v))
    B, h, Tq, d = q.shape
    Tk, dv = k.size(2), v.size(3)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(B, h, Tq, dv, dtype=torch.float64)
    weights = torch.zeros(B, h, Tq, Tk, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            g = kv_of_head[i]
            for t in range(Tq):
                scores = []
                for j in range(Tk):
                    if blocked is not None and blocked[b, i, t, j]:
                        scores.append(None)
                        continue
                    s = float((q[b, i, t] * k[b, g, j]).sum()) * scale
                    if bias is not None:
                        s += float(bias[b, i, t, j])
                    scores.append(s)
                live = [s for s in scores if s is not None and s != float("-inf")]
                if not live:
                    continue
                top = max(live)
                exps = [0.0 if s is None or s == float("-inf") else math.exp(s - top) for s in scores]
                total = sum(exps)
                for j in range(Tk):
                    w = exps[j] / total
                    weights[b, i, t, j] = w
                    out[b, i, t] += w * v[b, g, j]
    return out, weights


def rope_loop(x, positions, theta):
    """Rotate x (..., T, d) pair by pair: pair i is (x[i], x[i + d/2]) at angle pos * theta^(-2i/d)."""
    x = x.detach().double()
    d = x.size(-1)
    out = x.clone()
    for t, pos in enumerate(positions.tolist()):
        for i in range(d // 2):
            angle = pos * theta ** (-2.0 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            x1, x2 = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i] = x1 * c - x2 * s
            out[..., t, i + d // 2] = x2 * c + x1 * s
    return out


def contiguous_groups(num_heads, num_kv_heads):
    return [i // (num_heads // num_kv_heads) for i in range(num_heads)]


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor each aten op returns (to prove a tensor never appears)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out
