"""Attention layers on the headmods layer contract, one file per variant."""

from .base import CacheLike, HeadAttention, Projections, collect_aux_losses, read_mha
from .cmha import CMHAConfig, CMHAttention
from .config import AttentionConfig
from .dha import DHAAttention, DHAConfig
from .longheads import LongHeadsAttention, LongHeadsConfig
from .mha import MultiHeadAttention
from .moh import MoHAttention, MoHConfig
from .rcmha import RCMHAConfig, RCMHAttention
from .shrp import SHRPAttention, SHRPConfig

__all__ = [
    "AttentionConfig", "CacheLike", "DHAAttention", "DHAConfig", "HeadAttention", "LongHeadsAttention", "LongHeadsConfig", "MoHAttention", "MoHConfig", "SHRPAttention", "SHRPConfig", "MultiHeadAttention", "Projections",
    "CMHAConfig", "CMHAttention",
    "RCMHAConfig", "RCMHAttention",
    "collect_aux_losses", "read_mha",
]
