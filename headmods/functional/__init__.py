"""Pure tensor functions (no module state): masks, rotary embeddings, the attention kernel dispatch."""

from .attend import IMPLS, attend, check_kv_map, resolve_impl
from .decoupled import decoupled_attend, head_pairs
from .masks import AttentionMask, causal_bias, from_hf_padding, from_mha, from_sdpa
from .rope import apply_rope, positions_from, rope_cos_sin, rope_inv_freq, rotate_half

__all__ = [
    "IMPLS", "attend", "check_kv_map", "resolve_impl", "decoupled_attend", "head_pairs",
    "AttentionMask", "causal_bias", "from_hf_padding", "from_mha", "from_sdpa",
    "apply_rope", "positions_from", "rope_cos_sin", "rope_inv_freq", "rotate_half",
]
