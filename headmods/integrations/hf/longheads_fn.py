"""LongHeads as a transformers attention function: no module replaced, ``set_attn_implementation`` only.

LongHeads changes only how ``q, k, v`` become the output, so a LLaMA-family model can run it under
a registered attention name (transformers' attention-function interface):

    >>> use_longheads(model, chunk_size=256, attend_length=2048)   # doctest: +SKIP

registers ``"headmods_longheads"`` with the ``"sdpa"`` mask builder (so causality is never lost),
puts the settings on every attention module and switches the model to it. transformers hands the
function queries and keys *after* RoPE at positions ``0..Tk-1`` (and caches roped keys); LongHeads
needs them un-roped, so the function rotates them back (the inverse rotation, exact up to float
rounding) before running :func:`headmods.layers.longheads.longheads_core`. The per-sequence
selection state lives on the transformers cache (one entry per attention module): a forward
pre-hook hands the function the cache the module was called with, since transformers does not
pass it on. Interleaved sequences, each with its own cache, decode exactly. Batches must be
unpadded; scaled RoPE is refused.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ...cache import layer_state
from ...functional.rope import apply_rope, rope_cos_sin
from ...layers.longheads import LongHeadsConfig, LongHeadsState, _host_rope_theta, check_mask, longheads_core
from .attention_fns import register_attention
from .common import HFCacheView, hf_mask, pick_cache

__all__ = ["NAME", "longheads_hf_attention", "use_longheads"]

NAME = "headmods_longheads"


def longheads_hf_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, *, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``q (B, h, Tq, d)``, roped -> ``(B, Tq, h, d)``."""
    config: LongHeadsConfig | None = getattr(module, "headmods_longheads", None)
    if config is None:
        raise ValueError(f"{type(module).__name__} has no LongHeads settings; call use_longheads(model, ...) first")
    check_mask(hf_mask(attention_mask, causal=True))
    Tq, Tk, d = query.size(2), key.size(2), query.size(3)
    past = Tk - Tq
    cos, sin = rope_cos_sin(torch.arange(Tk, device=key.device), d, config.rope_theta, dtype=query.dtype)
    q = apply_rope(query, cos[:, past:], -sin[:, past:])  # rotate back: un-roped queries
    k = apply_rope(key, cos, -sin)
    ref = module.__dict__.get("_headmods_cache")
    cache = None if ref is None else ref()
    state = LongHeadsState() if cache is None else layer_state(HFCacheView(cache, module.layer_idx), module,
                                                                  LongHeadsState)
    if scaling is not None and abs(scaling - d ** -0.5) > 1e-12 * scaling:
        config = config.replace(scale=scaling)
    out = longheads_core(q, k, value, past, state, config)
    return out.transpose(1, 2), None


def use_longheads(model: nn.Module, *, chunk_size: int, attend_length: int, begin_selective_length: int | None = None,
                  selection: str = "block", query_position: int | None = None) -> list[str]:
    """Run every LLaMA-family attention module of ``model`` with LongHeads; returns their paths."""
    from .llama import LlamaHost

    paths = []
    for path, module in model.named_modules():
        if LlamaHost.matches(module):
            c = module.config
            module.headmods_longheads = LongHeadsConfig(
                embed_dim=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                head_dim=module.head_dim, rope_theta=_host_rope_theta(module), chunk_size=chunk_size,
                attend_length=attend_length, begin_selective_length=begin_selective_length, selection=selection,
                query_position=query_position)
            for handle in module.__dict__.pop("_headmods_hooks", ()):
                handle.remove()
            module._headmods_hooks = (module.register_forward_pre_hook(_remember_cache, with_kwargs=True),
                                      module.register_forward_hook(_forget_cache))
            paths.append(path)
    if not paths:
        raise ValueError(f"{type(model).__name__} has no LLaMA-family attention modules for LongHeads")
    register_attention(NAME, longheads_hf_attention, mask="sdpa")
    model.set_attn_implementation(NAME)
    return paths


def _remember_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: the cache of this call (weakly), for :func:`longheads_hf_attention`."""
    cache = pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"), kwargs.get("past_key_value"))
    module.__dict__["_headmods_cache"] = None if cache is None else weakref.ref(cache)


def _forget_cache(module: nn.Module, args: tuple, output: Any) -> None:
    module.__dict__.pop("_headmods_cache", None)
