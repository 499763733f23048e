"""Host adapters: how a headmods layer takes the place of another library's attention module.

A *host* is an attention module some model already has (``nn.MultiheadAttention``, HF
``LlamaAttention``, ``BertAttention``, ``GPT2Attention``, a timm ``Attention``). Each host kind
is a :class:`Host` subclass that knows three things:

- ``matches(module)``: is this module that kind of host (checked explicitly, by class and parts);
- ``extract(module)``: its projection weights and the layer settings that reproduce it;
- ``mixin``: a class that gives a headmods layer the host's forward signature, mixed in front of
  the variant class (``adapter_class(host, variant)``), so the replacement *is* a headmods layer
  (``isinstance(m, HeadAttention)``, same ``core``) and keeps the host's parameter names where
  they coincide (LLaMA's ``q_proj/k_proj/v_proj/o_proj``).

``Host.attach(adapter, module)`` copies host pieces that are not attention math (LayerNorm,
residual dropout, ``layer_idx``) from the replaced module. Hosts whose module is already
MHA-compatible (``nn.MultiheadAttention``) use the variant class itself (``mixin = None``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..layers.base import HeadAttention, Projections

__all__ = ["Host", "Extracted", "adapter_class", "host_list", "host_named", "find_host"]


@dataclass
class Extracted:
    """What a host module holds: projection weights plus the settings that rebuild it."""

    weights: Projections
    embed_dim: int
    num_heads: int
    settings: dict[str, Any] = field(default_factory=dict)


class Host:
    """One kind of host attention module (subclass per kind; stateless, used as a class)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    mixin: ClassVar[type | None] = None

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def extract(cls, module: nn.Module) -> Extracted:
        raise NotImplementedError

    @classmethod
    def attach(cls, adapter: HeadAttention, module: nn.Module) -> None:
        """Copy non-attention pieces of ``module`` onto ``adapter`` (default: nothing)."""

    @classmethod
    def export(cls, layer: HeadAttention, host_config: Any) -> dict[str, Any]:
        """The host module's state dict for ``layer`` (a plain ``mha`` layer), updating ``host_config``
        in place to the layer's head counts; raises ``ValueError`` when the host cannot express it."""
        raise ValueError(f"host {cls.name} has no stock export")

    @classmethod
    def prepare_parent(cls, model: nn.Module, path: str) -> None:
        """Adjust the enclosing model once a module at ``path`` was replaced (default: nothing)."""


@functools.cache
def adapter_class(host: type[Host], variant: type[HeadAttention]) -> type[HeadAttention]:
    """The layer class that runs ``variant`` behind ``host``'s forward signature."""
    if host.mixin is None:
        return variant
    cls = type(f"{variant.__name__}For{host.mixin.__name__}", (host.mixin, variant), {})
    cls.__module__ = host.mixin.__module__
    return cls


def _hosts() -> list[type[Host]]:
    from .hf.bert import BertHost
    from .hf.gpt2 import GPT2Host
    from .hf.llama import LlamaHost
    from .timm import TimmHost
    from .torch_nn import TorchMHAHost

    return [TorchMHAHost, LlamaHost, BertHost, GPT2Host, TimmHost]


def host_list() -> list[type[Host]]:
    """Every supported host kind, in detection order."""
    return _hosts()


def host_named(name: str) -> type[Host]:
    for host in _hosts():
        if host.name == name:
            return host
    raise ValueError(f"unknown host kind {name!r}; known: {[h.name for h in _hosts()]}")


def find_host(module: nn.Module) -> type[Host] | None:
    """The host kind ``module`` is, or None."""
    if isinstance(module, HeadAttention):
        return None  # already swapped
    for host in _hosts():
        if host.matches(module):
            return host
    return None
