"""``HeadAttention``: the ``nn.MultiheadAttention``-compatible front that every variant shares.

The front owns everything that is not the method: input checks, layout (seq-first or
batch-first, unbatched), mask conversion (once, to :class:`~headmods.functional.masks.AttentionMask`),
rotary positions, the cache offset, and head-averaging of returned weights. A variant implements
one batch-first ``core`` on ``(B, T, D)`` tensors; the HF and timm adapters call the same core,
so each method's math exists once.

Contract (``docs/design.md``): MHA's constructor prefix and forward signature, with two documented
differences: ``key``/``value`` default to ``query`` and ``need_weights`` defaults to False. The
attributes torch probes (``embed_dim``, ``num_heads``, ``head_dim``, ``batch_first``,
``_qkv_same_embed_dim = False``, ``in_proj_bias = None``) exist, so ``nn.TransformerEncoder``
takes the layer (built with ``enable_nested_tensor=False``).

Shapes: B batch, Tq query length, Tk key length (cached + new), D embed_dim, h heads,
h_kv kv heads, d head_dim.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..functional.masks import AttentionMask, from_mha
from ..functional.rope import positions_from, rope_cos_sin
from .config import AttentionConfig

__all__ = ["HeadAttention", "Projections", "CacheLike", "read_mha", "collect_aux_losses"]


class CacheLike(Protocol):
    """What a layer needs of a cache: how many tokens it holds, and appending to it."""

    seq_len: int

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class Projections(NamedTuple):
    """Weights of the four attention projections, ``nn.Linear`` layout ``(out_features, in_features)``."""

    q_weight: Tensor
    k_weight: Tensor
    v_weight: Tensor
    o_weight: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    o_bias: Tensor | None = None


def read_mha(module: nn.MultiheadAttention) -> tuple[Projections, dict[str, Any]]:
    """An ``nn.MultiheadAttention``'s q, k, v, o weights (the packed projection split) and its layer settings."""
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"expected nn.MultiheadAttention, got {type(module).__name__}")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True has no "
                         "headmods equivalent")
    if module._qkv_same_embed_dim:
        q_w, k_w, v_w = module.in_proj_weight.chunk(3)
    else:
        q_w, k_w, v_w = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    q_b = k_b = v_b = None
    if module.in_proj_bias is not None:
        q_b, k_b, v_b = module.in_proj_bias.chunk(3)
    weights = Projections(q_w, k_w, v_w, module.out_proj.weight, q_b, k_b, v_b, module.out_proj.bias)
    settings = dict(dropout=module.dropout, bias=q_b is not None, out_bias=module.out_proj.bias is not None,
                    kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first)
    return weights, settings


def collect_aux_losses(model: nn.Module, reduction: str = "sum") -> Tensor | None:
    """The ``aux_loss`` of every headmods layer in ``model``, summed or averaged (None when none has one).

    Routed layers set ``aux_loss`` (already multiplied by their config's ``aux_weight``) on each
    training forward and None in eval, so a training step reads
    ``loss = task_loss + collect_aux_losses(model, "mean")`` (MoH's paper averages over layers).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    losses = [m.aux_loss for m in model.modules() if isinstance(m, HeadAttention) and m.aux_loss is not None]
    if not losses:
        return None
    total = torch.stack(losses)
    return total.sum() if reduction == "sum" else total.mean()


class HeadAttention(nn.Module):
    """Base of every headmods attention layer; usable wherever ``nn.MultiheadAttention`` is.

    Args:
        embed_dim: model width D.
        num_heads: query heads.
        device, dtype: factory settings for parameters.
        **config: the fields of ``config_class`` (:class:`AttentionConfig` and the method's own),
            e.g. ``num_kv_heads``, ``dropout``, ``bias``, ``batch_first``, ``impl``, ``rope_theta``.

    Forward:
        ``query (L, N, E)`` or ``(N, L, E)`` with ``batch_first`` or unbatched ``(L, E)``;
        ``key``/``value`` likewise (default: ``query``). Masks follow MHA (bool True = masked out,
        float = added): ``key_padding_mask (N, S)``, ``attn_mask (L, S)`` or ``(N*h, L, S)``;
        ``is_causal=True`` applies a causal mask (aligned to the end of the keys). ``positions``
        (``(L,)`` or ``(N, L)`` ints) place rotary embeddings; by default they continue from the
        cache. ``cache`` is a :class:`~headmods.cache.KVCache` (or anything :class:`CacheLike`).
        Returns ``(output, weights)``; weights are ``(N, L, S)`` averaged or ``(N, h, L, S)``,
        and None unless ``need_weights=True``.
    """

    config_class: ClassVar[type[AttentionConfig]] = AttentionConfig
    variant: ClassVar[str] = ""
    # attributes torch's TransformerEncoder fast-path checks read; these values turn it off
    _qkv_same_embed_dim: ClassVar[bool] = False
    in_proj_bias: ClassVar[None] = None

    def __init__(self, embed_dim: int, num_heads: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **config: Any) -> None:
        super().__init__()
        self._config = self._make_config(embed_dim=embed_dim, num_heads=num_heads, **config)
        self.aux_loss: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a copy keeps (``copy.deepcopy``, ``AveragedModel``, pickling): everything but the
        ``aux_loss`` of the last forward, a tensor attached to that forward's graph."""
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    @classmethod
    def _make_config(cls, **settings: Any) -> AttentionConfig:
        known = {f for f in cls.config_class.__dataclass_fields__}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown settings {unknown}; its settings are {sorted(known)}")
        return cls.config_class(**settings)

    # -- configuration -------------------------------------------------------------------------
    @property
    def config(self) -> AttentionConfig:
        return self._config

    embed_dim = property(lambda self: self._config.embed_dim)
    num_heads = property(lambda self: self._config.num_heads)
    num_kv_heads = property(lambda self: self._config.num_kv_heads)
    head_dim = property(lambda self: self._config.head_dim)
    kdim = property(lambda self: self._config.kdim)
    vdim = property(lambda self: self._config.vdim)
    batch_first = property(lambda self: self._config.batch_first)
    dropout = property(lambda self: self._config.dropout)

    @classmethod
    def from_config(cls, config: AttentionConfig, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> "HeadAttention":
        """Build a fresh layer of this class from a config (e.g. one read back from JSON)."""
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        settings = config.to_dict()
        return cls(settings.pop("embed_dim"), settings.pop("num_heads"), device=device, dtype=dtype, **settings)

    @classmethod
    def from_projections(cls, weights: Projections, embed_dim: int, num_heads: int, **config: Any) -> "HeadAttention":
        """Build this variant around existing q, k, v, o projection weights (``nn.Linear`` layout).

        ``config`` gives the layer settings (``num_kv_heads``, ``head_dim``, ``bias``, method
        settings, ...); the layer is created on the weights' device and dtype, its projections
        copied, and its method parameters initialized to the variant's documented start.
        """
        ref = weights.o_weight
        layer = cls(embed_dim, num_heads, device=ref.device, dtype=ref.dtype, **config)
        with torch.no_grad():
            layer.load_projections(weights)
        return layer

    @classmethod
    def from_mha(cls, module: nn.MultiheadAttention, **config: Any) -> "HeadAttention":
        """Build this variant from an ``nn.MultiheadAttention``'s weights (``config`` adds method settings).

        Layout flags (``batch_first``, ``dropout``, ``bias``, ``kdim``, ``vdim``) are copied from
        ``module``. For MHA itself the result computes the same function.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_mha expects nn.MultiheadAttention, got {type(module).__name__}")
        weights, settings = read_mha(module)
        return cls.from_projections(weights, module.embed_dim, module.num_heads, **{**settings, **config})

    def load_projections(self, weights: Projections) -> None:
        """Copy q, k, v and output projection weights into this layer."""
        raise NotImplementedError(f"{type(self).__name__} does not take plain projection weights")

    def prune_heads(self, keep: Any) -> "HeadAttention":
        """Physically keep only the query heads ``keep``."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove heads")

    def extra_repr(self) -> str:
        c = self._config
        return (f"embed_dim={c.embed_dim}, num_heads={c.num_heads}, num_kv_heads={c.num_kv_heads}, "
                f"head_dim={c.head_dim}, batch_first={c.batch_first}, impl={c.impl!r}")

    # -- the method ----------------------------------------------------------------------------
    def core(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *,
             rope: tuple[Tensor, Tensor] | None = None, cache: CacheLike | None = None,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """The batch-first method: ``(B, Tq, D)`` inputs -> ``(B, Tq, D)`` output, ``(B, h, Tq, Tk)`` weights or None.

        ``mask`` covers all ``Tk`` keys (cached + new); ``rope`` is ``(cos, sin)`` for the new
        tokens, ``(B|1, Tq, head_dim)``; ``cache.update`` appends the new keys and values.
        """
        raise NotImplementedError

    # -- the front -----------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        positions: Tensor | None = None,
        cache: CacheLike | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]  # (1, L, E)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self._config.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (B, T, E)
        B, Tq, Tk = query.size(0), query.size(1), key.size(1)
        past = 0 if cache is None else cache.seq_len
        mask = from_mha(key_padding_mask, attn_mask, is_causal, batch_size=B, num_heads=self.num_heads,
                        q_len=Tq, k_len=past + Tk, dtype=query.dtype)
        rope = self._rope(positions, query, key, past)
        out, weights = self.core(query, key, value, mask, rope=rope, cache=cache, need_weights=need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, Tq, Tk)
        if unbatched:
            return out[0], None if weights is None else weights[0]
        if not self._config.batch_first:
            out = out.transpose(0, 1)  # (Tq, B, D)
        return out, weights

    def _rope(self, positions: Tensor | None, query: Tensor, key: Tensor, past: int) -> tuple[Tensor, Tensor] | None:
        theta = self._config.rope_theta
        if theta is None:
            if positions is not None:
                raise ValueError("positions were given, but this layer has no rotary embeddings (rope_theta=None)")
            return None
        B, Tq = query.size(0), query.size(1)
        if key.size(1) != Tq:
            raise ValueError(f"rotary embeddings need self-attention: query length {Tq} != key length {key.size(1)}")
        if positions is None:
            positions = positions_from(past, Tq, device=query.device)
        elif tuple(positions.shape) not in ((Tq,), (B, Tq)):
            raise ValueError(f"positions must have shape (seq_len,) = {(Tq,)} or (batch, seq_len) = {(B, Tq)}, "
                             f"got {tuple(positions.shape)}")
        return rope_cos_sin(positions, self.head_dim, theta, dtype=query.dtype)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        c = self._config
        names = ("query", "key", "value")
        tensors = (query, key, value)
        for name, t in zip(names, tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if query.dim() not in (2, 3):
            layout = "(batch, seq, embed_dim)" if c.batch_first else "(seq, batch, embed_dim)"
            raise ValueError(f"query must be 3-D {layout} or unbatched 2-D (seq, embed_dim), got shape {tuple(query.shape)}")
        for name, t in zip(names[1:], tensors[1:]):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must have the same rank as query ({query.dim()}), got shape {tuple(t.shape)}")
            if t.dtype != query.dtype:
                raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {query.dtype}")
        for name, t, size in zip(names, tensors, (c.embed_dim, c.kdim, c.vdim)):
            if t.size(-1) != size:
                raise ValueError(f"{name} last dimension must be {size}, got shape {tuple(t.shape)}")
        seq_dim = 0 if query.dim() == 2 or not c.batch_first else 1
        if query.dim() == 3:
            batch_dim = 1 - seq_dim
            if not query.size(batch_dim) == key.size(batch_dim) == value.size(batch_dim):
                raise ValueError(f"query, key and value batch sizes differ: {query.size(batch_dim)}, "
                                 f"{key.size(batch_dim)}, {value.size(batch_dim)}")
            if query.size(batch_dim) == 0:
                raise ValueError(f"empty batch: query has shape {tuple(query.shape)}")
        if key.size(seq_dim) != value.size(seq_dim):
            raise ValueError(f"key and value lengths differ: {key.size(seq_dim)} vs {value.size(seq_dim)}")
        if query.size(seq_dim) == 0 or key.size(seq_dim) == 0:
            raise ValueError(f"empty sequence: query shape {tuple(query.shape)}, key shape {tuple(key.shape)}")
        param = next(self.parameters(), None)
        if param is not None and param.dtype != query.dtype:
            raise TypeError(f"input dtype {query.dtype} differs from the layer's parameter dtype {param.dtype}")
        checked: list[Tensor] = []
        for name, t in zip(names, tensors):
            if not any(t is u for u in checked):  # self-attention: one check, not three
                _check_finite(name, t)
                checked.append(t)


def _check_finite(name: str, t: Tensor) -> None:
    """Raise on NaN/inf. One float32 sum on CPU (a full isfinite() pass costs ~3% of a layer);
    skipped on accelerators, where reading the result would force a device sync."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if not torch.isfinite(t.sum(dtype=torch.float32)) and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values")
