"""Kernel-only variants as transformers attention functions (the way in that replaces no module).

A variant that changes only ``q, k, v -> out`` (chunk routing, score biases) can run inside any
transformers model without replacing modules: register a function under a name, then
``model.set_attn_implementation(name)``. transformers builds the attention mask *per name*, and
a name without a mask function receives ``attention_mask=None``, which silently drops the causal
mask (transformers#45811). :func:`register_attention` therefore always registers the two together.

:func:`headmods_attention` is such a function running headmods' own kernel dispatch (grouped K/V,
SDPA/eager/flex); registered as ``"headmods_sdpa"`` it equals transformers' ``"sdpa"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ...functional.attend import attend
from .common import hf_mask

__all__ = ["headmods_attention", "register_attention"]


def headmods_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, *, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """A transformers attention function: ``q (B, h, T, d)``, ``k, v (B, h_kv, S, d)`` -> ``out (B, T, h, d)``."""
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    mask = hf_mask(attention_mask, causal=causal and attention_mask is None)
    impl = getattr(module, "headmods_impl", "auto")
    out, weights = attend(query, key, value, mask, scale=scaling, dropout_p=dropout, impl=impl)
    return out.transpose(1, 2), weights  # (B, T, h, d), as transformers' callers expect


def register_attention(name: str, fn: Callable[..., tuple[Tensor, Tensor | None]] = headmods_attention, *,
                       mask: str | Callable[..., Any] = "sdpa") -> str:
    """Register ``fn`` as transformers attention ``name`` together with its mask builder.

    Args:
        name: the name for ``model.set_attn_implementation(name)``.
        fn: the attention function (transformers' signature).
        mask: the mask builder: the name of a registered one (``"sdpa"``, ``"eager"``, ...) or a callable.

    Example:
        >>> register_attention("headmods_sdpa")  # doctest: +SKIP
        'headmods_sdpa'
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if isinstance(mask, str):
        known = AttentionMaskInterface._global_mapping
        if mask not in known:
            raise ValueError(f"unknown mask builder {mask!r}; registered: {sorted(known)}")
        mask = known[mask]
    if not callable(mask):
        raise TypeError(f"mask must be a builder name or a callable, got {type(mask).__name__}")
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask)
    return name
