"""Host: Hugging Face BERT-family attention (``BertAttention``: ``.self`` + ``.output``).

The whole ``BertAttention`` is replaced, because a headmods layer owns its output projection:
``.self.query/key/value`` become ``q_proj/k_proj/v_proj``, ``.output.dense`` becomes ``o_proj``,
and the residual ``LayerNorm`` and hidden dropout of ``.output`` are kept (as ``LayerNorm`` and
``hidden_dropout`` on the adapter). Forward: ``LayerNorm(dropout(attn(x)) + x)``, as BERT's.
Cross-attention modules (decoder BERT) are not hosts.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...layers.base import Projections
from ..base import Extracted, Host
from .common import check_only_children, default_scale, from_transformers, hf_mask, padded_projections


class BertAttentionAdapter:
    """Mixin: a headmods layer with ``BertAttention.forward``'s signature and its residual + LayerNorm."""

    is_causal: bool = False

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, past_key_value: Any = None,
                **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        if encoder_hidden_states is not None:
            raise NotImplementedError("the BERT adapter replaces self-attention only; got encoder_hidden_states")
        mask = hf_mask(attention_mask, causal=self.is_causal)
        out, weights = self.core(hidden_states, hidden_states, hidden_states, mask,
                                 need_weights=bool(kwargs.get("output_attentions", False)))
        return self.LayerNorm(self.hidden_dropout(out) + hidden_states), weights


class BertHost(Host):
    name = "hf_bert"
    description = "Hugging Face BERT-family attention (BertAttention with .self and .output)"
    mixin = BertAttentionAdapter

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        inner, output = getattr(module, "self", None), getattr(module, "output", None)
        return (from_transformers(module) and not getattr(module, "is_cross_attention", False)
                and all(isinstance(getattr(inner, p, None), nn.Linear) for p in ("query", "key", "value"))
                and isinstance(getattr(output, "dense", None), nn.Linear)
                and isinstance(getattr(output, "LayerNorm", None), nn.LayerNorm))

    @classmethod
    def extract(cls, module: nn.Module) -> Extracted:
        inner, output = module.self, module.output
        check_only_children(inner, {"query", "key", "value"})
        check_only_children(output, {"dense", "LayerNorm"})
        head_dim = inner.attention_head_size
        weights = Projections(inner.query.weight, inner.key.weight, inner.value.weight, output.dense.weight,
                              inner.query.bias, inner.key.bias, inner.value.bias, output.dense.bias)
        settings = dict(head_dim=head_dim, batch_first=True, bias=inner.query.bias is not None,
                        out_bias=output.dense.bias is not None, dropout=float(inner.dropout.p),
                        scale=default_scale(getattr(inner, "scaling", head_dim ** -0.5), head_dim))
        return Extracted(weights, inner.query.in_features, inner.num_attention_heads, settings)

    @classmethod
    def attach(cls, adapter: nn.Module, module: nn.Module) -> None:
        adapter.LayerNorm = module.output.LayerNorm
        adapter.hidden_dropout = module.output.dropout
        adapter.is_causal = bool(getattr(module.self, "is_causal", False))

    @classmethod
    def export(cls, layer: nn.Module, host_config: Any) -> dict[str, Any]:
        """BERT's head size is always ``hidden_size / num_heads``: pruned heads are zero-padded to it
        (same function, not fewer parameters; headmods' own format keeps the smaller tensors)."""
        c = layer.config
        if host_config.hidden_size % c.num_heads:
            raise ValueError(f"BERT needs num_heads to divide hidden_size ({host_config.hidden_size}); "
                             f"the layer has {c.num_heads} heads")
        head_dim = host_config.hidden_size // c.num_heads
        p = padded_projections(layer, head_dim, head_dim ** -0.5)
        host_config.num_attention_heads = c.num_heads
        state = {"self.query.weight": p.q_weight, "self.key.weight": p.k_weight, "self.value.weight": p.v_weight,
                 "output.dense.weight": p.o_weight, "self.query.bias": p.q_bias, "self.key.bias": p.k_bias,
                 "self.value.bias": p.v_bias, "output.dense.bias": p.o_bias}
        state.update({f"output.LayerNorm.{k}": v for k, v in layer.LayerNorm.state_dict().items()})
        return {k: v for k, v in state.items() if v is not None}
