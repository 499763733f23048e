"""Host: ``nn.MultiheadAttention``, alone or inside ``nn.TransformerEncoder`` / ``Decoder``.

headmods layers already speak MHA's forward contract, so the variant class replaces the module
directly. ``nn.TransformerEncoder`` needs one more change: its nested-tensor fast path reads
``self_attn.in_proj_weight`` in eval with a padding mask, so ``prepare_parent`` turns it off on
the enclosing encoder (``enable_nested_tensor = use_nested_tensor = False``). The encoder
*layer* fast path is turned off by the layer itself (``_qkv_same_embed_dim = False``).
"""

from __future__ import annotations

from torch import nn

from ..layers.base import read_mha
from .base import Extracted, Host


class TorchMHAHost(Host):
    name = "torch_mha"
    description = "torch.nn.MultiheadAttention (incl. nn.TransformerEncoder/Decoder layers)"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    @classmethod
    def extract(cls, module: nn.MultiheadAttention) -> Extracted:
        weights, settings = read_mha(module)
        return Extracted(weights, module.embed_dim, module.num_heads, settings)

    @classmethod
    def prepare_parent(cls, model: nn.Module, path: str) -> None:
        for name, parent in model.named_modules():
            if isinstance(parent, nn.TransformerEncoder) and path.startswith(f"{name}." if name else ""):
                parent.enable_nested_tensor = False
                parent.use_nested_tensor = False
