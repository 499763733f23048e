"""Variant registry: a name -> layer class table (timm's ``register_model`` pattern).

Each layer class carries its config class (``cls.config_class``), so the name alone rebuilds a
layer from a saved config: ``get_variant(name).from_config(config)``.

Example:
    >>> import headmods
    >>> attn = headmods.create("mha", 64, 4, num_kv_heads=2, batch_first=True)
    >>> "mha" in headmods.list_variants()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .layers.base import HeadAttention

__all__ = ["register_variant", "get_variant", "create", "list_variants"]

_VARIANTS: dict[str, type["HeadAttention"]] = {}

T = TypeVar("T", bound=type)


def register_variant(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`~headmods.layers.base.HeadAttention` subclass available by ``name``."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"variant names are lower-case identifiers, got {name!r}")

    def decorate(cls: T) -> T:
        from .layers.base import HeadAttention

        if not (isinstance(cls, type) and issubclass(cls, HeadAttention)):
            raise TypeError(f"register_variant({name!r}) expects a HeadAttention subclass, got {cls!r}")
        if name in _VARIANTS and _VARIANTS[name] is not cls:
            raise ValueError(f"variant {name!r} is already registered to {_VARIANTS[name].__qualname__}")
        cls.variant = name
        _VARIANTS[name] = cls
        return cls

    return decorate


def get_variant(name: str) -> type["HeadAttention"]:
    """The layer class registered as ``name``."""
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; available: {list_variants()}") from None


def create(name: str, embed_dim: int, num_heads: int, **cfg: Any) -> "HeadAttention":
    """Build the variant ``name``: ``create("mha", 768, 12, num_kv_heads=4)``."""
    return get_variant(name)(embed_dim, num_heads, **cfg)


def list_variants() -> list[str]:
    """Names of every registered variant, sorted."""
    return sorted(_VARIANTS)
