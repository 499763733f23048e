"""Pieces every Hugging Face host adapter shares: masks, caches, keyword spellings.

Masks: transformers builds the mask for the model's ``_attn_implementation`` (``"sdpa"`` by
default) and hands the attention module ``None`` (plain causal or no padding), a 4-D bool mask
``(B, 1, Tq, Tk)`` with ``True`` = attend, or a 4-D float mask (eager: 0 / dtype-min). All three
map to :class:`~headmods.functional.masks.AttentionMask` here, once.

Caches: a transformers ``Cache`` is shared by all layers and updated with the layer index;
:class:`HFCacheView` presents one layer of it as the ``seq_len`` / ``update(k, v)`` object the
headmods core expects, and keeps the layers' decode state (``layer_states``) on the transformers
cache itself, so the state lives and dies with the sequence that cache holds.

Keywords: transformers 5.x passes the cache as ``cache`` (5.24+), ``past_key_values`` (5.0-5.23)
or ``past_key_value`` (4.5x); adapters accept all three and ignore the rest (``position_ids``,
``use_cache``, ``cache_position``, ...).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ...functional.masks import AttentionMask, from_hf_padding, from_sdpa
from ...layers.base import Projections

__all__ = ["hf_mask", "HFCacheView", "cache_states", "pick_cache", "linear_projections"]


def hf_mask(attention_mask: Tensor | None, *, causal: bool) -> AttentionMask:
    """The internal mask for what a transformers model passes its attention modules.

    A 4-D mask already holds causality (transformers folds it in), so only ``None`` and a 2-D
    padding mask take ``causal`` from the host.
    """
    if attention_mask is None:
        return AttentionMask(causal=causal)
    if attention_mask.dim() == 2:
        return from_hf_padding(attention_mask, causal=causal)
    if attention_mask.dim() == 4:
        return _structured(attention_mask, causal) or from_sdpa(attention_mask)
    raise ValueError(f"expected a transformers attention mask of shape (batch, key_len) or "
                     f"(batch, 1, query_len, key_len), got {tuple(attention_mask.shape)}")


def _structured(mask: Tensor, causal: bool) -> AttentionMask | None:
    """A 4-D bool mask that is just key padding (plus causality for a causal host), as a
    ``(B, 1, 1, Tk)`` key bias with the causal flag; None when it is anything else.

    transformers materializes ``(B, 1, Tq, Tk)`` masks even for plain padding; recognizing them
    (one comparison, O(B Tq Tk) booleans) lets layers keep their fast paths (SDPA's causal kernel,
    MoH's sparse execution) on padded batches.
    """
    if mask.dtype != torch.bool or mask.size(1) != 1:
        return None
    keys = mask[:, :, -1:, :]  # the last query sees every non-padding key, causal or not
    q_len, k_len = mask.shape[-2:]
    expected = keys & torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len) \
        if causal else keys.expand_as(mask)
    if not torch.equal(mask, expected):
        return None
    return AttentionMask(None if bool(keys.all()) else from_sdpa(keys).bias, causal)


class HFCacheView:
    """One layer of a transformers ``Cache``, as the headmods core uses a cache."""

    def __init__(self, cache: Any, layer_idx: int, kwargs: dict[str, Any] | None = None) -> None:
        self.cache, self.layer_idx, self.kwargs = cache, layer_idx, kwargs or {}

    @property
    def seq_len(self) -> int:
        return int(self.cache.get_seq_length(self.layer_idx))

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k, v, self.layer_idx, kwargs=self.kwargs)

    @property
    def layer_states(self) -> weakref.WeakKeyDictionary:
        """Per-layer decode state, kept on the transformers cache (see :func:`headmods.cache.layer_state`)."""
        return cache_states(self.cache)


def cache_states(cache: Any) -> weakref.WeakKeyDictionary:
    """The headmods decode states that a transformers ``Cache`` carries, keyed weakly by layer."""
    states = cache.__dict__.get("headmods_layer_states")
    if states is None:
        states = cache.__dict__["headmods_layer_states"] = weakref.WeakKeyDictionary()
    return states


def pick_cache(cache: Any = None, past_key_values: Any = None, past_key_value: Any = None) -> Any:
    """The cache object under whichever keyword this transformers version used."""
    given = [c for c in (cache, past_key_values, past_key_value) if c is not None]
    if len(given) > 1 and any(c is not given[0] for c in given[1:]):
        raise ValueError("got different caches under 'cache', 'past_key_values' and 'past_key_value'")
    return given[0] if given else None


def linear_projections(q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear) -> Projections:
    """Projections from four ``nn.Linear`` modules."""
    return Projections(q.weight, k.weight, v.weight, o.weight, q.bias, k.bias, v.bias, o.bias)


def check_only_children(module: nn.Module, allowed: set[str]) -> None:
    """Refuse hosts carrying parameters the adapter would silently drop (e.g. q/k norms)."""
    extra = sorted(name for name, child in module.named_children()
                   if name not in allowed and any(True for _ in child.parameters()))
    if extra:
        raise ValueError(f"{type(module).__name__} has parameterized parts {extra} that headmods does not "
                         f"reproduce (supported parts: {sorted(allowed)})")


def default_scale(scale: float, head_dim: int) -> float | None:
    """None when ``scale`` is the usual ``head_dim ** -0.5`` (the config then stays default)."""
    return None if abs(scale - head_dim ** -0.5) < 1e-12 * max(1.0, scale) else float(scale)


def from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def padded_projections(layer: nn.Module, head_dim: int, host_scale: float) -> Projections:
    """The layer's projections with each head zero-padded to ``head_dim``, for hosts whose head
    size is fixed to ``hidden_size / num_heads`` (BERT, GPT-2).

    Zero rows in q and k leave every score unchanged except for the host's scale, which the q rows
    absorb (``q *= layer_scale / host_scale``); zero v rows and o columns add nothing to the output.
    """
    c = layer.config
    if c.num_kv_heads != c.num_heads:
        raise ValueError(f"this host has no grouped kv heads; the layer has {c.num_heads} query and "
                         f"{c.num_kv_heads} kv heads")
    if head_dim < c.head_dim:
        raise ValueError(f"the host's head size would be {head_dim}, smaller than the layer's {c.head_dim}")
    factor = (c.scale or c.head_dim ** -0.5) / host_scale

    def rows(t: Tensor | None, scale: float = 1.0) -> Tensor | None:
        if t is None:
            return None
        t = t.detach().view(c.num_heads, c.head_dim, *t.shape[1:]) * scale  # (h, d, ...)
        out = t.new_zeros(c.num_heads, head_dim, *t.shape[2:])
        out[:, :c.head_dim] = t
        return out.flatten(0, 1)  # (h * head_dim, ...)

    o = layer.o_proj.weight.detach().view(c.embed_dim, c.num_heads, c.head_dim)
    o_padded = o.new_zeros(c.embed_dim, c.num_heads, head_dim)
    o_padded[:, :, :c.head_dim] = o
    return Projections(rows(layer.q_proj.weight, factor), rows(layer.k_proj.weight), rows(layer.v_proj.weight),
                       o_padded.flatten(1), rows(layer.q_proj.bias, factor), rows(layer.k_proj.bias),
                       rows(layer.v_proj.bias), None if layer.o_proj.bias is None else layer.o_proj.bias.detach())
