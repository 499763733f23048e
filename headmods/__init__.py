"""headmods: head-structured attention layers for PyTorch.

Every layer is a drop-in for ``nn.MultiheadAttention`` (see :class:`HeadAttention`);
``create(name, embed_dim, num_heads, **cfg)`` builds one by name.
"""

from . import errors
from .cache import KVCache
from .errors import HeadmodsError
from .layers import (
    AttentionConfig,
    CMHAConfig,
    CMHAttention,
    DHAAttention,
    DHAConfig,
    HeadAttention,
    LongHeadsAttention,
    LongHeadsConfig,
    MoHAttention,
    MoHConfig,
    MultiHeadAttention,
    Projections,
    RCMHAConfig,
    RCMHAttention,
    SHRPAttention,
    SHRPConfig,
    collect_aux_losses,
)
from .registry import create, get_variant, list_variants, register_variant
from .io import export, load, save
from .swap import SwapReport, swap

__version__ = "0.1.0.dev0"

__all__ = [
    "AttentionConfig",
    "CMHAConfig",
    "CMHAttention",
    "DHAAttention",
    "DHAConfig",
    "HeadAttention",
    "HeadmodsError",
    "KVCache",
    "LongHeadsAttention",
    "LongHeadsConfig",
    "MoHAttention",
    "MoHConfig",
    "MultiHeadAttention",
    "Projections",
    "RCMHAConfig",
    "RCMHAttention",
    "SHRPAttention",
    "SHRPConfig",
    "collect_aux_losses",
    "create",
    "get_variant",
    "list_variants",
    "register_variant",
    "swap",
    "SwapReport",
    "save",
    "load",
    "export",
    "errors",
    "__version__",
]
