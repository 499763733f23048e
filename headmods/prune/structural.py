"""Structural head removal over a whole model, with parameter, MAC and latency accounting.

``prune_heads`` validates the complete plan before it touches any layer, so a bad plan leaves the
model as it was; then each named layer's own ``prune_heads`` slices its q/k/v rows and o columns
(GQA-aware: a kv head goes when no kept query head reads it). A layer whose plan keeps all of its
heads is not touched (its parameters stay the same objects). Pruned layers get new, smaller
parameters: rebuild any optimizer afterwards.

``count_macs`` counts multiply-accumulates of one forward with hooks: every ``nn.Linear``
(``in_features * out_features`` per token) and, for each prunable headmods layer, the two dense
attention products ``2 * h * Tq * Tk * d`` per batch element (``Tq`` read from the ``o_proj``
input, ``Tk`` from the ``k_proj`` output plus the length of a ``cache=`` passed to the layer).
Masked positions count (the kernels compute them); embeddings, norms, activations and softmax do
not.

Example:
    >>> from torch import nn
    >>> from headmods import MultiHeadAttention
    >>> from headmods.prune import HeadPrunePlan
    >>> model = nn.Sequential(MultiHeadAttention(8, 4, batch_first=True))
    >>> report = prune_heads(model, HeadPrunePlan({"0": (0, 2)}), example_inputs=(torch.randn(1, 3, 8),))
    >>> model[0].num_heads, report.macs_after < report.macs_before
    (2, True)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..bench import compare
from .importance import eval_mode
from .plan import HeadPrunePlan, checked_layers, prunable_layers
from .report import LayerRow, PruneReport

__all__ = ["prune_heads", "count_macs"]

Inputs = tuple[Any, ...] | Mapping[str, Any]


def prune_heads(model: nn.Module, plan: HeadPrunePlan, *, example_inputs: Inputs | None = None,
                latency_rounds: int = 0) -> PruneReport:
    """Remove the heads ``plan`` leaves out, physically, in place; return a before/after report.

    Args:
        model: any module holding headmods layers; changed in place.
        plan: a :class:`~headmods.prune.HeadPrunePlan` (indices into each layer's current heads).
        example_inputs: positional args (tuple) or keyword args (dict) for ``model(...)``; enables
            MAC counts (and latency).
        latency_rounds: when > 0, time ``model(*example_inputs)`` under ``torch.no_grad()`` in eval
            mode with :func:`headmods.bench.compare` (2 warm-up rounds, then this many), the
            unpruned copy and the pruned model alternately. This keeps a deep copy of the unpruned
            model while timing (twice the memory).

    Example:
        >>> from torch import nn
        >>> from headmods import MultiHeadAttention
        >>> model = nn.Sequential(MultiHeadAttention(8, 4, num_kv_heads=2))
        >>> r = prune_heads(model, HeadPrunePlan({"0": (2, 3)}))
        >>> (r.layers[0].heads_after, r.layers[0].kv_heads_after, r.layers[0].kept_heads)
        (2, 1, (2, 3))
    """
    layers = checked_layers(model, plan)
    inputs = _check_inputs(example_inputs)
    if isinstance(latency_rounds, bool) or not isinstance(latency_rounds, int) or latency_rounds < 0:
        raise ValueError(f"latency_rounds must be an int >= 0, got {latency_rounds!r}")
    if latency_rounds and inputs is None:
        raise ValueError(f"latency_rounds={latency_rounds} needs example_inputs to time the model on")
    before = {p: (layer.num_heads, layer.num_kv_heads) for p, layer in layers.items()}
    params_before, attn_before = _param_counts(model, layers)
    macs_before = None if inputs is None else _count(model, inputs)
    reference = copy.deepcopy(model) if latency_rounds else None

    for path, keep in plan.keep.items():
        layer = layers[path]
        if len(keep) < layer.num_heads:
            layer.prune_heads(list(keep))

    layers = prunable_layers(model)  # a layer may hold its projections by new objects now
    params_after, attn_after = _param_counts(model, layers)
    rows = [LayerRow(path=p, heads_before=before[p][0], heads_after=layer.num_heads, kv_heads_before=before[p][1],
                     kv_heads_after=layer.num_kv_heads, kept_heads=tuple(layer.config.kept_heads or range(layer.num_heads)))
            for p, layer in layers.items()]
    report = PruneReport(rows, params_before, params_after, attn_before, attn_after, plan=plan.to_dict())
    if inputs is not None:
        report.macs_before, report.macs_after = macs_before, _count(model, inputs)
    if reference is not None:
        report.latency_ms_before, report.latency_ms_after, report.latency_ratio = \
            _latency(reference, model, inputs, latency_rounds)
    return report


def _check_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tuple of positional args or a dict of keyword args for "
                    f"model(...), got {type(example_inputs).__name__} (wrap a single tensor as (x,))")


def _param_counts(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    attn = {id(p): p.numel() for layer in layers.values() for p in layer.parameters()}
    return total, sum(attn.values())


def _latency(reference: nn.Module, model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]],
             rounds: int) -> tuple[float, float, float]:
    args, kwargs = inputs
    param = next(model.parameters(), None)
    device = "cpu" if param is None or param.device.type != "cuda" else str(param.device)

    def run(m: nn.Module):
        return lambda: m(*args, **kwargs)

    with eval_mode(model), eval_mode(reference), torch.no_grad():
        result = compare({"before": run(reference), "after": run(model)}, baseline="before", rounds=rounds,
                         device=device, memory=False)
    return result.median_ms("before"), result.median_ms("after"), result.ratio("after")


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """Multiply-accumulates of one forward of ``model`` on ``example_inputs`` (see the module docstring).

    Runs under ``torch.no_grad()`` in eval mode (training flags restored); hooks are removed
    even when the forward fails.

    Example:
        >>> from torch import nn
        >>> from headmods import MultiHeadAttention
        >>> # 4 projections of 8 x 8 on 3 tokens, plus 2 * (4 heads * 2 dims) * 3 * 3
        >>> count_macs(nn.Sequential(MultiHeadAttention(8, 4, batch_first=True)), (torch.randn(1, 3, 8),))
        912
    """
    inputs = _check_inputs(example_inputs)
    if inputs is None:
        raise TypeError("count_macs needs example_inputs (a tuple or dict of arguments), got None")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return _count(model, inputs)


def _count(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> int:
    total = [0]
    handles = []

    def linear_hook(module: nn.Linear, args: tuple[Any, ...], out: torch.Tensor) -> None:
        total[0] += module.in_features * module.out_features * (out.numel() // module.out_features)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    for layer in prunable_layers(model).values():
        handles += _attention_hooks(layer, total)
    try:
        with eval_mode(model), torch.no_grad():
            args, kwargs = inputs
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def _attention_hooks(layer: nn.Module, total: list[int]) -> list[Any]:
    """Hooks that add ``2 * B * Tq * Tk * h * d`` for each call of ``layer`` to ``total[0]``."""
    state = {"past": 0, "keys": 0}

    def on_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache")
        state["past"], state["keys"] = int(getattr(cache, "seq_len", 0) or 0), 0

    def on_keys(module: nn.Linear, args: tuple[Any, ...], out: torch.Tensor) -> None:
        state["keys"] += out.numel() // module.out_features  # B * Tk_new tokens

    def on_output(module: nn.Linear, args: tuple[Any, ...]) -> None:
        x = args[0]  # (B, Tq, h*d), batch-first in the core
        batch = x.size(0) if x.dim() == 3 else 1
        tq = x.numel() // (module.in_features * batch)
        tk = state["past"] + state["keys"] // batch
        total[0] += 2 * batch * tq * tk * module.in_features
        state["past"], state["keys"] = 0, 0

    return [layer.register_forward_pre_hook(on_call, with_kwargs=True),
            layer.k_proj.register_forward_hook(on_keys),
            layer.o_proj.register_forward_pre_hook(on_output)]
