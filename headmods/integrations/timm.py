"""Host: a timm-style ViT ``Attention`` (fused ``qkv`` Linear, ``proj`` Linear, ``num_heads``).

Matched by structure, so it works with timm itself and with the many ViT codebases that copy its
attention: ``forward(x, attn_mask=None, is_causal=False) -> Tensor`` with ``attn_mask`` in SDPA's
convention (bool ``True`` = attend). q/k norms and the optional post-attention norm must be
identities (they are by default); anything else is refused rather than dropped. timm is not a
dependency: nothing here imports it.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..functional.masks import from_sdpa
from ..layers.base import Projections
from .base import Extracted, Host
from .hf.common import default_scale

_OPTIONAL_IDENTITIES = ("q_norm", "k_norm", "norm")


class TimmAttentionAdapter:
    """Mixin: a headmods layer with timm ``Attention.forward``'s signature (returns a tensor)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        out, _ = self.core(x, x, x, from_sdpa(attn_mask, is_causal))
        return self.proj_drop(out)


class TimmHost(Host):
    name = "timm"
    description = "timm-style ViT Attention (qkv/proj Linear, num_heads)"
    mixin = TimmAttentionAdapter

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        return (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
                and isinstance(getattr(module, "num_heads", None), int) and qkv.out_features % 3 == 0)

    @classmethod
    def extract(cls, module: nn.Module) -> Extracted:
        for name in _OPTIONAL_IDENTITIES:
            part = getattr(module, name, None)
            if part is not None and not isinstance(part, nn.Identity):
                raise ValueError(f"timm Attention with a non-identity {name} ({type(part).__name__}) is not supported")
        h = module.num_heads
        inner = module.qkv.out_features // 3
        q_w, k_w, v_w = module.qkv.weight.split(inner, dim=0)
        q_b = k_b = v_b = None
        if module.qkv.bias is not None:
            q_b, k_b, v_b = module.qkv.bias.split(inner)
        weights = Projections(q_w, k_w, v_w, module.proj.weight, q_b, k_b, v_b, module.proj.bias)
        head_dim = inner // h
        attn_drop = getattr(module, "attn_drop", None)
        settings = dict(head_dim=head_dim, batch_first=True, bias=q_b is not None,
                        out_bias=module.proj.bias is not None,
                        dropout=float(attn_drop.p) if isinstance(attn_drop, nn.Dropout) else 0.0,
                        scale=default_scale(float(getattr(module, "scale", head_dim ** -0.5)), head_dim))
        return Extracted(weights, module.qkv.in_features, h, settings)

    @classmethod
    def attach(cls, adapter: nn.Module, module: nn.Module) -> None:
        adapter.proj_drop = getattr(module, "proj_drop", None) or nn.Identity()
