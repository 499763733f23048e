"""Attention layers on the headmods layer contract, one file per variant."""

from .base import CacheLike, HeadAttention, Projections, collect_aux_losses, read_mha
from .config import AttentionConfig
from .mha import MultiHeadAttention

__all__ = [
    "AttentionConfig", "CacheLike", "HeadAttention", "MultiHeadAttention", "Projections",
    "collect_aux_losses", "read_mha",
]
