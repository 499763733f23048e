"""Attention layers on the headmods layer contract, one file per variant."""

from .base import CacheLike, HeadAttention, Projections, collect_aux_losses, read_mha
from .config import AttentionConfig
from .mha import MultiHeadAttention
from .moh import MoHAttention, MoHConfig

__all__ = [
    "AttentionConfig", "CacheLike", "HeadAttention", "MoHAttention", "MoHConfig", "MultiHeadAttention", "Projections",
    "collect_aux_losses", "read_mha",
]
