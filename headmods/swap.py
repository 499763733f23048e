"""``headmods.swap``: replace the attention modules of an existing model with a headmods variant.

Example:
    >>> import torch, headmods
    >>> from torch import nn
    >>> layer = nn.TransformerEncoderLayer(64, 4, batch_first=True)
    >>> model = nn.TransformerEncoder(layer, num_layers=2)
    >>> report = headmods.swap(model, "mha")
    >>> report.paths
    ['layers.0.self_attn', 'layers.1.self_attn']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .integrations.base import Host, adapter_class, find_host, host_list
from .layers.base import HeadAttention
from .layers.config import AttentionConfig
from .registry import get_variant

__all__ = ["swap", "SwapReport", "build_layer", "set_submodule"]

Targets = str | Sequence[str] | Callable[[str, nn.Module], bool]
INITS = ("copy", "random")


@dataclass
class SwapReport:
    """What :func:`swap` replaced: ``(path, host kind)`` pairs and the parameter counts around it."""

    variant: str
    replaced: list[tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.replaced]

    @property
    def param_delta(self) -> int:
        return self.params_after - self.params_before

    def __str__(self) -> str:
        hosts = sorted({host for _, host in self.replaced})
        return (f"swapped {len(self.replaced)} attention modules ({', '.join(hosts)}) for {self.variant!r}; "
                f"parameters {self.params_before:,} -> {self.params_after:,} ({self.param_delta:+,})")


def _supported() -> str:
    return "; ".join(f"{h.name}: {h.description}" for h in host_list())


def _unknown_host_error(what: str) -> ValueError:
    return ValueError(f"{what}. Supported hosts: {_supported()}. Choose modules yourself with "
                      "targets=[module paths] or targets=callable(name, module) -> bool, each naming a "
                      "module of a supported kind.")


def _select(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module, type[Host]]]:
    chosen: list[tuple[str, nn.Module, type[Host]]] = []
    if targets == "auto":
        for path, module in model.named_modules():
            if any(path.startswith(f"{p}.") for p, _, _ in chosen):
                continue  # inside a module already chosen
            host = find_host(module)
            if host is not None:
                chosen.append((path, module, host))
        if not chosen:
            raise _unknown_host_error(f"no supported attention module found in {type(model).__name__}")
        return chosen
    if isinstance(targets, str):
        raise ValueError(f"targets must be 'auto', a list of module paths or a callable, got the string {targets!r}")
    if callable(targets):
        picked = [(p, m) for p, m in model.named_modules() if targets(p, m)]
        if not picked:
            raise ValueError("targets callable selected no module")
    else:
        names = dict(model.named_modules())
        missing = [p for p in targets if p not in names]
        if missing:
            raise ValueError(f"targets name modules that do not exist: {missing}")
        picked = [(p, names[p]) for p in targets]
    for path, module in picked:
        host = find_host(module)
        if host is None:
            raise _unknown_host_error(f"module {path!r} ({type(module).__name__}) is not a supported host")
        chosen.append((path, module, host))
    return chosen


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` inside ``model``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def build_layer(module: nn.Module, host: type[Host], variant: type[HeadAttention], *, init: str = "copy",
                config: AttentionConfig | None = None, **cfg: Any) -> HeadAttention:
    """The headmods layer that replaces host ``module``.

    ``init="copy"`` builds it from the module's weights (the variant's function-preserving start
    where the method has one); ``"random"`` initializes it afresh; a full ``config`` (e.g. read
    from a checkpoint, possibly pruned) rebuilds that exact structure with fresh weights.
    """
    cls = adapter_class(host, variant)
    ref = next(module.parameters())
    if config is not None:
        layer = cls.from_config(config, device=ref.device, dtype=ref.dtype)
    else:
        ex = host.extract(module)
        settings = {**ex.settings, **cfg}
        if hasattr(variant, "host_settings"):  # a variant that needs more of the host (LongHeads: RoPE base)
            settings = variant.host_settings(module, settings)
        if init == "copy":
            layer = cls.from_projections(ex.weights, ex.embed_dim, ex.num_heads, **settings)
        else:
            layer = cls(ex.embed_dim, ex.num_heads, device=ref.device, dtype=ref.dtype, **settings)
    host.attach(layer, module)
    layer.host_kind = host.name  # recorded in checkpoints, so load() knows what the layer replaced
    layer.train(module.training)
    return layer


def swap(model: nn.Module, variant: str | type[HeadAttention] = "mha", *, targets: Targets = "auto",
         init: str = "copy", **cfg: Any) -> SwapReport:
    """Replace attention modules of ``model`` in place with headmods ``variant`` layers.

    Args:
        model: any ``nn.Module`` holding supported attention modules (see ``headmods.integrations``).
        variant: a registered variant name or class.
        targets: ``"auto"`` (every supported attention module), a list of module paths, or a
            predicate ``(name, module) -> bool``.
        init: ``"copy"`` transfers the host's weights (function-preserving where the method
            allows), ``"random"`` starts fresh.
        **cfg: variant settings (e.g. ``impl="eager"``); layout settings come from each host.

    Returns:
        A :class:`SwapReport` with the replaced paths and the parameter delta.
    """
    variant_cls = get_variant(variant) if isinstance(variant, str) else variant
    if not (isinstance(variant_cls, type) and issubclass(variant_cls, HeadAttention)):
        raise TypeError(f"variant must be a registered name or a HeadAttention subclass, got {variant!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    chosen = _select(model, targets)
    report = SwapReport(variant_cls.variant or variant_cls.__name__)
    report.params_before = sum(p.numel() for p in model.parameters())
    layers = [(path, host, build_layer(module, host, variant_cls, init=init, **cfg)) for path, module, host in chosen]
    for path, host, layer in layers:  # every layer built before any is put in: no half-swapped model
        set_submodule(model, path, layer)
        host.prepare_parent(model, path)
        report.replaced.append((path, host.name))
    report.params_after = sum(p.numel() for p in model.parameters())
    return report
