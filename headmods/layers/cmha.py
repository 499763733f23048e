"""CMHA: ComplexFormer's head-specific complex vector attention, run as attention on re-phased heads.

Paper: ComplexFormer (CMHA, "head-specific complex vector attention"), Shao et al., arXiv 2505.10222
(May 2025). The arXiv listing now says the paper is withdrawn: its claims are unreviewed. Official
code: shaojintian/complexFormer (``attention/complex_attention.py``). Method page: ``docs/methods/cmha.md``.

Each head reads its query and key vectors as ``d/2`` complex numbers (pair ``j`` is dimensions
``j`` and ``j + d/2``, the pairing of Hugging Face RoPE), in polar form ``rho``, ``theta``. The
logit mixes a learned, per-head affine map of the semantic phase difference with the RoPE
position phase::

    s_hmn = sum_j rho^q_mj rho^k_nj cos(delta_hj (theta^q_mj - theta^k_nj) + beta_hj + (m - n) omega_j)

It is separable (derivation in :mod:`headmods.functional.complex_phase`): re-phase each pair,
``q_hat = rho^q [cos, sin](delta theta^q + beta)`` and ``k_hat = rho^k [cos, sin](delta theta^k)``,
rotate both by RoPE, and run ordinary attention. So CMHA costs MHA plus ``O(T d)`` elementwise work,
runs on SDPA with causal kernels, and its KV cache holds ``k_hat`` after RoPE (the cache is updated
after :meth:`CMHAttention.place_heads`). ``delta = 1, beta = 0`` is RoPE attention exactly, up to
the ``1e-9`` under the square root: that is the function-preserving start from RoPE checkpoints.

Parameters: ``delta (h_kv, d/2)`` and ``beta (h, d/2)``, per head and frequency. Under GQA a key
head serves several query heads, and ``delta`` acts on the key's phase too, so a key head can carry
one ``delta`` only: ``delta`` is per *key/value* head (shared by the query heads of its group, as
the KV cache is) and ``beta``, which only the queries carry, is per query head. With MHA
(``h_kv = h``) both are per head, as in the official code. ``omega_j`` is RoPE's: the layer's
``rope_theta`` (default 10000, the official fixed base) when used natively; inside a Hugging Face
model the model's own ``(cos, sin)``, so its ``rope_theta`` and any RoPE scaling carry over.

Differences from the official code, on purpose:

- scores are scaled by ``1 / sqrt(d)`` (``config.scale=None``); the official code does not scale
  at all (``scale=1.0`` reproduces it);
- the causal mask is always the caller's (``is_causal=True`` for language models; Hugging Face
  hosts pass theirs). The official LM path (``pretrain/my_decoder_only_model.py``) calls its CMHA
  branch with only the 0/1 padding mask *added* to the logits and no causal mask, so that model
  can see future tokens; headmods never does that;
- ``phase_init="rope"`` (default) starts at ``delta = 1, beta = 0``; the official start
  ``delta ~ N(0, std=1/sqrt(d/2))``, ``beta = 0`` is ``phase_init="paper"``. It shrinks and flips
  phase differences at random, so it suits training from scratch, not conversion;
- the logit is computed in the separable form above, not as the official ``(B, h, 8, T, d/2)``
  cosine tensor per chunk of 8 queries (the same function, far faster on CPU:
  ``benchmarks/results/cmha_cpu.md``);
- an exactly zero pair gets phase 0 (as ``atan2(0, 0)``) and a finite gradient
  (:func:`~headmods.functional.complex_phase.polar_pairs`), where plain ``atan2`` gives NaN.

Shapes: B batch, T tokens, D embed_dim, h query heads, h_kv key/value heads, d head_dim (even).

Example:
    >>> attn = CMHAttention(64, 4, num_kv_heads=2, batch_first=True, phase_init="paper")
    >>> out, _ = attn(torch.randn(2, 7, 64), is_causal=True)
    >>> out.shape, tuple(attn.delta.shape), tuple(attn.beta.shape)
    (torch.Size([2, 7, 64]), (2, 8), (4, 8))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..functional.complex_phase import complex_phase
from ..functional.rope import apply_rope
from ..registry import register_variant
from .config import AttentionConfig, host_rope
from .mha import MultiHeadAttention, check_keep, slice_param

__all__ = ["CMHAConfig", "CMHAttention", "PHASE_INITS"]

PHASE_INITS = ("rope", "paper")


@dataclass(frozen=True)
class CMHAConfig(AttentionConfig):
    """CMHA settings on top of :class:`AttentionConfig` (RoPE is required; ``head_dim`` must be even).

    Attributes:
        rope_theta: base of the position frequencies ``omega_j = rope_theta ** (-2j / d)``;
            10000 by default (the official code's fixed base). When swapped into a Hugging Face
            model it records the model's base, and the model's own ``(cos, sin)`` are used.
        phase_init: start of ``delta``/``beta``: ``"rope"`` (``delta = 1, beta = 0``: exactly RoPE
            attention) or ``"paper"`` (official: ``delta ~ N(0, std=1/sqrt(d/2))``, ``beta = 0``).
            Not called ``init``: ``headmods.swap`` already takes ``init`` ("copy" / "random").
        scale: (inherited) ``1 / sqrt(head_dim)`` by default; the official code uses 1.
    """

    rope_theta: float | None = 10000.0
    phase_init: str = "rope"

    def __post_init__(self) -> None:
        head_dim = _given_head_dim(self)
        if head_dim is not None and head_dim % 2:
            raise ValueError(f"CMHA pairs dimension j with j + head_dim/2 as one complex number, so head_dim "
                             f"must be even; got head_dim={head_dim} (embed_dim={self.embed_dim}, "
                             f"num_heads={self.num_heads})")
        super().__post_init__()
        if self.rope_theta is None:
            raise ValueError("CMHA needs rotary position frequencies (its (m - n) omega phase); got rope_theta=None. "
                             "Give rope_theta (e.g. 10000.0, the official base)")
        if self.phase_init not in PHASE_INITS:
            raise ValueError(f"phase_init must be one of {PHASE_INITS}, got {self.phase_init!r}")


def _given_head_dim(config: AttentionConfig) -> int | None:
    """The head size the config will resolve to, when it can be read before validation."""
    if config.head_dim is not None:
        return config.head_dim if isinstance(config.head_dim, int) else None
    e, h = config.embed_dim, config.num_heads
    if isinstance(e, int) and isinstance(h, int) and h > 0 and e % h == 0:
        return e // h
    return None


@register_variant("cmha")
class CMHAttention(MultiHeadAttention):
    """ComplexFormer attention on the headmods layer contract (see the module docstring).

    Arguments as :class:`HeadAttention`, plus :class:`CMHAConfig`'s ``phase_init``. Parameters
    beyond MHA's: ``delta (num_kv_heads, head_dim // 2)`` and ``beta (num_heads, head_dim // 2)``.
    """

    config_class = CMHAConfig

    def __init__(self, embed_dim: int, num_heads: int, *, device=None, dtype=None, **config: Any) -> None:
        super().__init__(embed_dim, num_heads, device=device, dtype=dtype, **config)
        c, dd = self.config, {"device": device, "dtype": dtype}
        self.delta = nn.Parameter(torch.empty(c.num_kv_heads, c.head_dim // 2, **dd))  # (h_kv, d/2)
        self.beta = nn.Parameter(torch.empty(c.num_heads, c.head_dim // 2, **dd))  # (h, d/2)
        self.reset_phases()

    def reset_parameters(self) -> None:
        """Projections as MHA initializes them, then ``delta``/``beta`` as ``phase_init`` says."""
        super().reset_parameters()
        if "delta" in self._parameters:  # absent while MultiHeadAttention.__init__ runs
            self.reset_phases()

    def reset_phases(self) -> None:
        """``beta = 0``; ``delta = 1`` (``phase_init="rope"``) or ``N(0, std=1/sqrt(d/2))`` (``"paper"``)."""
        with torch.no_grad():
            if self.config.phase_init == "rope":
                self.delta.fill_(1.0)
            else:
                nn.init.normal_(self.delta, std=(self.config.head_dim // 2) ** -0.5)
            self.beta.zero_()

    @classmethod
    def host_settings(cls, module: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
        """Swapping: record a Hugging Face host's RoPE base; refuse hosts that give no rotary positions.

        ``nn.MultiheadAttention`` hosts call the layer's own forward, which places RoPE from
        ``rope_theta``; a transformers host must be a RoPE model (it passes its ``(cos, sin)``).
        """
        if isinstance(module, nn.MultiheadAttention):
            return settings
        theta, _ = host_rope(module)  # scaled RoPE is fine: the host's (cos, sin) are used
        if theta is None:
            raise ValueError(f"CMHA needs rotary positions, and {type(module).__name__} gets none from its model "
                             "(absolute-position hosts such as BERT, GPT-2 and ViT are not supported); swap it into "
                             "a RoPE model (LLaMA family) or into nn.MultiheadAttention with rope_theta=...")
        given = settings.get("rope_theta")
        if given is not None and float(given) != theta:
            raise ValueError(f"inside {type(module).__name__} CMHA uses the model's own rotary embeddings "
                             f"(rope_theta={theta}); got rope_theta={given}. Leave rope_theta unset")
        return {**settings, "rope_theta": theta}

    # -- the method ----------------------------------------------------------------------------
    def place_heads(self, q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Re-phase ``q (B, h, Tq, d)`` and ``k (B, h_kv, Tk, d)`` per head and frequency, then apply RoPE."""
        if rope is None:
            raise ValueError("CMHA needs rotary positions: the core got rope=None. Call the layer's forward (it "
                             "places RoPE from config.rope_theta) or a host that passes (cos, sin), e.g. HF LLaMA")
        q = apply_rope(complex_phase(q, self.query_delta(), self.beta), *rope)  # (B, h, Tq, d)
        k = apply_rope(complex_phase(k, self.delta), *rope)  # (B, h_kv, Tk, d): what the cache stores
        return q, k

    def query_delta(self) -> Tensor:
        """``delta`` per query head, ``(h, d/2)``: each query head uses its key/value head's row."""
        c = self.config
        if c.num_kv_heads == c.num_heads and c.kv_map is None:
            return self.delta
        if c.kv_map is None:
            return self.delta.repeat_interleave(c.num_heads // c.num_kv_heads, dim=0)
        return self.delta.index_select(0, torch.tensor(c.kv_map, device=self.delta.device))

    # -- heads out -----------------------------------------------------------------------------
    def prune_heads(self, keep: Sequence[int]) -> "CMHAttention":
        """Keep query heads ``keep`` (see :meth:`MultiHeadAttention.prune_heads`); ``beta`` rows follow
        the query heads, ``delta`` rows the kv heads that remain."""
        c = self.config
        keep = check_keep(keep, c.num_heads)
        to_kv = c.query_to_kv()
        kept_kv = sorted({to_kv[i] for i in keep})
        super().prune_heads(keep)
        self.delta = slice_param(self.delta, 0, kept_kv)
        self.beta = slice_param(self.beta, 0, keep)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope_theta={self.config.rope_theta}, phase_init={self.config.phase_init!r}"
