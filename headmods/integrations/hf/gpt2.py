"""Host: Hugging Face GPT-2 attention (``GPT2Attention``: fused ``c_attn`` + ``c_proj``, both ``Conv1D``).

``Conv1D`` stores weights as ``(in, out)``, the transpose of ``nn.Linear``; ``c_attn`` packs q, k, v
along ``out``. The adapter splits and transposes them into ``q_proj/k_proj/v_proj/o_proj`` and
keeps the residual dropout. GPT-2's score scale (``module.scaling``, which folds in
``scale_attn_weights`` and ``scale_attn_by_inverse_layer_idx``) becomes the layer's ``scale``. Cross-attention is not a host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...layers.base import Projections
from ..base import Extracted, Host
from .common import HFCacheView, default_scale, from_transformers, hf_mask, padded_projections, pick_cache


class GPT2AttentionAdapter:
    """Mixin: a headmods layer with ``GPT2Attention.forward``'s signature."""

    layer_idx: int = 0
    is_causal: bool = True

    def forward(self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                output_attentions: bool = False, past_key_values: Any = None, past_key_value: Any = None,
                layer_past: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        if encoder_hidden_states is not None:
            raise NotImplementedError("the GPT-2 adapter replaces self-attention only; got encoder_hidden_states")
        cache = pick_cache(cache, past_key_values, past_key_value if layer_past is None else layer_past)
        view = None if cache is None else HFCacheView(cache, self.layer_idx, kwargs)
        mask = hf_mask(attention_mask, causal=self.is_causal)
        out, weights = self.core(hidden_states, hidden_states, hidden_states, mask, cache=view,
                                 need_weights=bool(output_attentions))
        return self.resid_dropout(out), weights


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and hasattr(module, "nf")


class GPT2Host(Host):
    name = "hf_gpt2"
    description = "Hugging Face GPT-2 attention (c_attn/c_proj Conv1D, transposed weights)"
    mixin = GPT2AttentionAdapter

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (from_transformers(module) and not getattr(module, "is_cross_attention", False)
                and _is_conv1d(getattr(module, "c_attn", None)) and _is_conv1d(getattr(module, "c_proj", None)))

    @classmethod
    def extract(cls, module: nn.Module) -> Extracted:
        D, h = module.embed_dim, module.num_heads
        q_w, k_w, v_w = module.c_attn.weight.t().split(D, dim=0)  # Conv1D (in, 3D) -> three (D, in)
        q_b, k_b, v_b = module.c_attn.bias.split(D)
        weights = Projections(q_w, k_w, v_w, module.c_proj.weight.t(), q_b, k_b, v_b, module.c_proj.bias)
        settings = dict(head_dim=module.head_dim, batch_first=True, dropout=float(module.attn_dropout.p),
                        scale=default_scale(module.scaling, module.head_dim))
        return Extracted(weights, D, h, settings)

    @classmethod
    def attach(cls, adapter: nn.Module, module: nn.Module) -> None:
        adapter.resid_dropout = module.resid_dropout
        adapter.layer_idx = module.layer_idx

    @classmethod
    def export(cls, layer: nn.Module, host_config: Any) -> dict[str, Any]:
        """GPT-2's head size is always ``n_embd / n_head``: pruned heads are zero-padded to it."""
        c = layer.config
        if host_config.n_embd % c.num_heads:
            raise ValueError(f"GPT-2 needs n_head to divide n_embd ({host_config.n_embd}); the layer has "
                             f"{c.num_heads} heads")
        head_dim = host_config.n_embd // c.num_heads
        scale = head_dim ** -0.5 if host_config.scale_attn_weights else 1.0
        if host_config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer.layer_idx + 1)
        p = padded_projections(layer, head_dim, scale)
        host_config.n_head = c.num_heads
        return {"c_attn.weight": torch.cat([p.q_weight, p.k_weight, p.v_weight]).t().contiguous(),
                "c_attn.bias": torch.cat([p.q_bias, p.k_bias, p.v_bias]),
                "c_proj.weight": p.o_weight.t().contiguous(), "c_proj.bias": p.o_bias}
