"""Host: the Hugging Face LLaMA family (``LlamaAttention`` and look-alikes: Mistral, SmolLM, ...).

Matched explicitly: a transformers module with ``nn.Linear`` ``q_proj/k_proj/v_proj/o_proj``, a
``layer_idx`` and a config with ``num_attention_heads`` / ``num_key_value_heads``, and nothing
else that has parameters (so Qwen3-style q/k norms are refused, not dropped).

The adapter keeps the host's parameter names (``self_attn.q_proj.weight``, ...), takes RoPE as the
``position_embeddings`` the model computes (so every rope scaling the host supports carries over),
caches through the host's ``Cache`` and returns ``(output, weights or None)``. Setting
``host_rope = False`` on an adapter makes it ignore the host's RoPE (the core gets ``rope=None``):
the layer then sees positions only through its own terms (RCMHA's relative logits and
convolutions) or not at all; the ``compare`` recipe's ``positions: none | absolute`` uses it. The
flag is not part of the layer config, so a headmods checkpoint does not record it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..base import Extracted, Host
from .common import (HFCacheView, check_only_children, default_scale, from_transformers, hf_mask,
                     linear_projections, pick_cache)

_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LlamaAttentionAdapter:
    """Mixin: a headmods layer with ``LlamaAttention.forward``'s signature."""

    layer_idx: int = 0
    is_causal: bool = True
    host_rope: bool = True  # False: the host's (cos, sin) are not passed to the core (rope=None)

    @property
    def num_key_value_groups(self) -> int:
        return self.config.num_heads // self.config.num_kv_heads

    @property
    def scaling(self) -> float:
        return self.config.scale or self.config.head_dim ** -0.5

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                past_key_value: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        cache = pick_cache(cache, past_key_values, past_key_value)
        view = None if cache is None else HFCacheView(cache, self.layer_idx, kwargs)
        mask = hf_mask(attention_mask, causal=self.is_causal)
        rope = position_embeddings if self.host_rope else None
        return self.core(hidden_states, hidden_states, hidden_states, mask, rope=rope, cache=view,
                         need_weights=bool(kwargs.get("output_attentions", False)))


class LlamaHost(Host):
    name = "hf_llama"
    description = "Hugging Face LLaMA-family attention (q_proj/k_proj/v_proj/o_proj, RoPE, GQA)"
    mixin = LlamaAttentionAdapter

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        config = getattr(module, "config", None)
        return (from_transformers(module) and hasattr(module, "layer_idx")
                and all(isinstance(getattr(module, p, None), nn.Linear) for p in _PARTS)
                and hasattr(config, "num_attention_heads") and hasattr(config, "num_key_value_heads"))

    @classmethod
    def extract(cls, module: nn.Module) -> Extracted:
        check_only_children(module, set(_PARTS))
        c = module.config
        head_dim = module.head_dim
        settings = dict(num_kv_heads=c.num_key_value_heads, head_dim=head_dim, batch_first=True,
                        bias=module.q_proj.bias is not None, out_bias=module.o_proj.bias is not None,
                        dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0),
                        scale=default_scale(module.scaling, head_dim))
        weights = linear_projections(module.q_proj, module.k_proj, module.v_proj, module.o_proj)
        return Extracted(weights, c.hidden_size, c.num_attention_heads, settings)

    @classmethod
    def attach(cls, adapter: nn.Module, module: nn.Module) -> None:
        adapter.layer_idx = module.layer_idx
        adapter.is_causal = getattr(module, "is_causal", True)

    @classmethod
    def export(cls, layer: nn.Module, host_config: Any) -> dict[str, Any]:
        c = layer.config
        if c.scale is not None:
            raise ValueError(f"LLaMA scales scores by head_dim ** -0.5; the layer uses scale={c.scale}")
        host_config.num_attention_heads = c.num_heads
        host_config.num_key_value_heads = c.num_kv_heads
        host_config.head_dim = c.head_dim
        return {f"{part}.{name}": t for part in _PARTS for name, t in getattr(layer, part).state_dict().items()}
