"""ComplexFormer's (CMHA) head-specific complex attention in its separable form.

CMHA (Shao et al., arXiv 2505.10222; ``docs/methods/cmha.md``) reads a head vector of size
``d`` as ``d/2`` complex numbers, paired the way Hugging Face RoPE pairs dimensions: pair ``j`` is
``a_j + i b_j`` with ``a = x[..., :d/2]``, ``b = x[..., d/2:]``. In polar form
``rho = sqrt(a^2 + b^2 + eps)`` and ``theta = atan2(b, a)``. Head ``h`` scores query ``m`` against
key ``n`` as::

    s_mn = sum_j rho^q_mj rho^k_nj cos(delta_hj (theta^q_mj - theta^k_nj) + beta_hj + (m - n) omega_j)

The cosine of a phase difference is a dot product of unit vectors, so the score splits: with
``phi^q = delta theta^q + beta + m omega`` and ``phi^k = delta theta^k + n omega``, and
``x_hat = cat([rho cos(phi), rho sin(phi)])``, ``s_mn = q_hat_m . k_hat_n``. CMHA is therefore
ordinary attention (SDPA, causal kernels, a KV cache of ``k_hat``) on transformed queries and keys:
``O(T d)`` extra elementwise work instead of the official ``O(T^2 d)`` cosine tensor. The positional
part ``m omega_j`` rotates pair ``j`` by ``m omega_j``, which is exactly RoPE, so
:func:`complex_phase` applies only the semantic part and RoPE (the host's own ``cos``/``sin`` when
there is a host) follows it.

Shapes: ``x (..., h, T, d)``, ``delta`` and ``beta (h, d/2)``; the output has the shape of ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EPS", "complex_phase", "polar_pairs"]

EPS = 1e-9  # under the square root of the magnitude, as in the official code


def polar_pairs(x: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Magnitude ``rho`` and phase ``theta`` of the half-split pairs of ``x (..., d)``, each ``(..., d/2)``.

    Half-precision inputs are computed in float32 (their squares overflow float16) and the results
    cast back. The phase is ``atan2(b, a)`` in value, but its gradient is regularized to
    ``(a db - b da) / (a^2 + b^2 + eps)``. The exact derivative divides by ``a^2 + b^2``: it is
    undefined for a pair that is exactly zero and huge for a tiny one (a pair of size 1e-12 would
    pass back about 1e7 times its output gradient), while ``rho`` stays at least ``sqrt(eps)``.
    Regularized, the re-phased pair's gradient is bounded by ``(1 + |delta|)`` times its output
    gradient everywhere; an exactly zero pair has phase 0 (as ``atan2(0, 0)``) and gradient 0, and
    elsewhere the change is a relative ``eps / (a^2 + b^2)``.

    >>> rho, theta = polar_pairs(torch.tensor([3.0, 0.0, 4.0, 0.0]))
    >>> [round(v, 4) for v in rho.tolist()], theta.tolist()
    ([5.0, 0.0], [0.9272952079772949, 0.0])
    """
    d = x.size(-1)
    if d % 2:
        raise ValueError(f"complex pairs need an even last dimension (head_dim), got {d}")
    if x.dtype in (torch.float16, torch.bfloat16):
        # a^2 + b^2 overflows float16 once a pair passes ~181 (65504 ** 0.5 / 2 ** 0.5): work in float32
        rho, theta = polar_pairs(x.float(), eps)
        return rho.to(x.dtype), theta.to(x.dtype)
    a, b = x[..., :d // 2], x[..., d // 2:]
    rho2 = torch.addcmul(a * a, b, b).add_(eps)  # (..., d/2)
    rho = rho2.sqrt()
    if not (torch.is_grad_enabled() and x.requires_grad):
        return rho, torch.atan2(b, a)
    a0, b0 = a.detach(), b.detach()
    # a0 * b - b0 * a is exactly 0 in value (the same two products), so theta keeps atan2's value
    theta = torch.atan2(b0, a0) + (a0 * b - b0 * a) / rho2.detach()
    return rho, theta


def complex_phase(x: Tensor, delta: Tensor, beta: Tensor | None = None, *, eps: float = EPS) -> Tensor:
    """``cat([rho cos(phi), rho sin(phi)])`` with ``phi = delta * theta + beta``, per head and frequency.

    Args:
        x: projected heads ``(..., h, T, d)``, ``d`` even, before RoPE.
        delta: ``(h, d/2)`` scale of each head's phase (CMHA's ``delta``; 1 leaves the phase alone).
        beta: ``(h, d/2)`` phase offset, or None (CMHA adds it to queries only).
        eps: added to ``a^2 + b^2`` under the square root (see :func:`polar_pairs` for gradients).

    Returns:
        A tensor shaped like ``x``. With ``delta = 1`` and ``beta = 0`` it is ``x`` scaled by
        ``rho / |pair|``, i.e. ``x`` up to ``eps``.

    Example:
        >>> x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
        >>> y = complex_phase(x, torch.ones(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))
        >>> bool((y - x).abs().max() < 1e-6)
        True
    """
    if x.dim() < 3:
        raise ValueError(f"x must be (..., heads, seq, head_dim), got shape {tuple(x.shape)}")
    shape = (x.size(-3), x.size(-1) // 2)
    for name, t in (("delta", delta), ("beta", beta)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape (heads, head_dim // 2) = {shape} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16):  # float32 inside, as polar_pairs does
        return complex_phase(x.float(), delta.float(), None if beta is None else beta.float(), eps=eps).to(x.dtype)
    rho, theta = polar_pairs(x, eps)  # (..., h, T, d/2) each
    phi = theta * delta[:, None] if beta is None else torch.addcmul(beta[:, None], theta, delta[:, None])
    return torch.cat([rho * phi.cos(), rho * phi.sin()], dim=-1)  # (..., h, T, d)
