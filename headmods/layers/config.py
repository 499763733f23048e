"""The frozen, JSON-round-tripping configuration shared by every attention variant.

Method configs (``MoHConfig``, ...) subclass :class:`AttentionConfig` and add their own fields,
so one config describes a whole layer: ``type(layer).from_config(layer.config)`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..functional.attend import IMPLS, check_kv_map

__all__ = ["AttentionConfig", "host_rope"]

C = TypeVar("C", bound="AttentionConfig")


def _check_int(name: str, value: Any, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """Structure and behaviour of an attention layer; unset fields are resolved on construction.

    Attributes:
        embed_dim: model width D (query input and output size).
        num_heads: query heads h.
        num_kv_heads: key/value heads; h (MHA) by default, 1 for MQA, a divisor of h for GQA.
        head_dim: per-head size d; ``embed_dim // num_heads`` by default (explicit after pruning).
        kv_map: query head -> kv head, for non-contiguous groups (e.g. after pruning GQA);
            None means contiguous groups of ``num_heads // num_kv_heads``.
        dropout: dropout on attention probabilities (training only).
        bias: biases on the q, k and v projections (and on the output projection unless
            ``out_bias`` says otherwise).
        out_bias: bias on the output projection; None means the same as ``bias`` (timm ViTs
            have none on qkv but one on the output; Qwen2 the other way round).
        kdim, vdim: key / value input sizes (``embed_dim`` by default), as in ``nn.MultiheadAttention``.
        batch_first: ``(B, T, D)`` inputs when True, ``(T, B, D)`` when False (MHA's default).
        impl: kernel: ``"auto"`` (SDPA; eager when weights are requested), ``"sdpa"``, ``"eager"``, ``"flex"``.
        rope_theta: base of rotary embeddings on q and k (HF rotate-half layout); None = no RoPE.
        scale: score scale; ``1 / sqrt(head_dim)`` by default.
        kept_heads: after pruning, the original index of each remaining query head (recorded
            in checkpoints); None when no head was removed.
    """

    embed_dim: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    kv_map: tuple[int, ...] | None = None
    dropout: float = 0.0
    bias: bool = True
    out_bias: bool | None = None
    kdim: int | None = None
    vdim: int | None = None
    batch_first: bool = False
    impl: str = "auto"
    rope_theta: float | None = None
    scale: float | None = None
    kept_heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_int("embed_dim", self.embed_dim)
        _check_int("num_heads", self.num_heads)
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(f"num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim}), "
                                 "or give head_dim explicitly")
            self._set("head_dim", self.embed_dim // self.num_heads)
        _check_int("head_dim", self.head_dim)
        self._set("num_kv_heads", self.num_heads if self.num_kv_heads is None else self.num_kv_heads)
        _check_int("num_kv_heads", self.num_kv_heads)
        if self.kv_map is None:
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads}), "
                                 "or give kv_map explicitly")
        else:
            self._set("kv_map", tuple(int(j) for j in self.kv_map))
            check_kv_map(self.kv_map, self.num_heads, self.num_kv_heads)
            if self.kv_map == self.contiguous_kv_map():
                self._set("kv_map", None)  # canonical form: contiguous groups are spelled None
        self._set("out_bias", self.bias if self.out_bias is None else self.out_bias)
        for name in ("kdim", "vdim"):
            self._set(name, self.embed_dim if getattr(self, name) is None else getattr(self, name))
            _check_int(name, getattr(self, name))
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.rope_theta is not None:
            if not self.rope_theta > 0:
                raise ValueError(f"rope_theta must be positive or None, got {self.rope_theta!r}")
            if self.head_dim % 2:
                raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.kept_heads is not None:
            self._set("kept_heads", tuple(int(i) for i in self.kept_heads))
            k = self.kept_heads
            if len(k) != self.num_heads or len(set(k)) != len(k) or min(k) < 0 or list(k) != sorted(k):
                raise ValueError(f"kept_heads must list {self.num_heads} distinct ascending head indices, got {k}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive or None, got {self.scale!r}")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # resolving defaults inside a frozen dataclass

    def contiguous_kv_map(self) -> tuple[int, ...] | None:
        """The map that contiguous groups mean, or None when they are not uniform."""
        if self.num_heads % self.num_kv_heads:
            return None
        group = self.num_heads // self.num_kv_heads
        return tuple(i // group for i in range(self.num_heads))

    def query_to_kv(self) -> tuple[int, ...]:
        """The query-head -> kv-head map, spelled out whether or not ``kv_map`` is set."""
        return self.kv_map if self.kv_map is not None else self.contiguous_kv_map()

    def value_heads(self) -> int:
        """Value heads; values share the key heads' grouping here (DHA decouples them)."""
        return self.num_kv_heads

    def query_to_value(self) -> tuple[int, ...]:
        """The query-head -> value-head map, spelled out."""
        return self.query_to_kv()

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)


def host_rope(module: Any) -> tuple[float | None, str]:
    """``(rope_theta or None, rope_type)`` from a transformers attention module's ``config``.

    Reads ``rope_parameters`` (transformers 5) or the plain ``rope_theta`` attribute (4.x);
    ``rope_type`` is ``"default"`` for plain RoPE.
    """
    config = getattr(module, "config", None)
    params = getattr(config, "rope_parameters", None)
    params = params if isinstance(params, dict) else {}
    theta = params.get("rope_theta")
    theta = theta if theta is not None else getattr(config, "rope_theta", None)
    return (None if theta is None else float(theta)), (params.get("rope_type") or "default")
