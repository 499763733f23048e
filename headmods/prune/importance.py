"""Head importance scores: weight magnitude, ablation (loss when a head is zeroed), first-order Taylor.

Every method returns layer path -> ``(num_heads,)`` float32 scores on the CPU, higher = more
important, for each prunable headmods layer (:func:`~headmods.prune.plan.prunable_layers`). The
output of head ``i`` is the slice ``[..., i*d:(i+1)*d]`` of the input of the layer's ``o_proj``;
the data-driven methods work on that slice through temporary hooks and never modify weights.

- ``"magnitude"`` (data-free): ``|W_q rows of i| + |W_o columns of i| + (|W_k rows of g| +
  |W_v rows of g|) / n_g``, Frobenius norms of the weights (biases are not counted), where ``g``
  is the kv head head ``i`` reads and ``n_g`` how many query heads read it.
- ``"ablation"``: mean over batches of ``loss(head i zeroed) - loss``; one forward per batch and
  head, under ``torch.no_grad()`` in eval mode.
- ``"taylor"`` (Michel et al., 2019, "Are Sixteen Heads Really Better than One?", arXiv:1905.10650):
  ``|sum over batches and tokens of dL/dh_i . h_i|`` with ``h_i`` head ``i``'s output, in eval
  mode (no dropout). Gradients are taken with ``torch.autograd.grad`` on zero probes added to the
  ``o_proj`` inputs, so parameters' ``.grad`` stay exactly as they were, frozen models work, and
  nothing accumulates.

Both data-driven methods put every module in eval mode and restore each module's own training
flag afterwards; ``batches`` is read into a list once (it is iterated more than once).

Example:
    >>> from torch import nn
    >>> from headmods import MultiHeadAttention
    >>> model = nn.Sequential(MultiHeadAttention(8, 2, batch_first=True))
    >>> head_importance(model, "magnitude")["0"].shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .plan import require_layers

__all__ = ["head_importance", "METHODS", "eval_mode"]

METHODS = ("magnitude", "ablation", "taylor")

LossFn = Callable[[nn.Module, Any], Tensor]


def head_importance(model: nn.Module, method: str, *, batches: Iterable[Any] | None = None,
                    loss_fn: LossFn | None = None) -> dict[str, Tensor]:
    """Score every query head of every prunable headmods layer in ``model``.

    Args:
        model: any module holding headmods layers (a plain stack, an HF host, ...).
        method: ``"magnitude"``, ``"ablation"`` or ``"taylor"`` (see the module docstring).
        batches: calibration batches for the data-driven methods (any objects ``loss_fn`` takes).
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss tensor.

    Returns:
        layer path -> ``(num_heads,)`` float32 CPU tensor, higher = more important.

    Example:
        >>> from torch import nn
        >>> from headmods import MultiHeadAttention
        >>> model = nn.Sequential(MultiHeadAttention(8, 2, batch_first=True))
        >>> loss = lambda m, x: m(x)[0].pow(2).mean()
        >>> scores = head_importance(model, "ablation", batches=[torch.randn(2, 3, 8)], loss_fn=loss)
        >>> list(scores), scores["0"].shape
        (['0'], torch.Size([2]))
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; known methods: {list(METHODS)}")
    layers = require_layers(model)
    if method == "magnitude":
        return {path: _magnitude(layer) for path, layer in layers.items()}
    batches = _check_data(method, batches, loss_fn)
    if method == "ablation":
        return _ablation(model, layers, batches, loss_fn)
    return _taylor(model, layers, batches, loss_fn)


def _check_data(method: str, batches: Iterable[Any] | None, loss_fn: LossFn | None) -> list[Any]:
    if batches is None or loss_fn is None:
        missing = [n for n, v in (("batches", batches), ("loss_fn", loss_fn)) if v is None]
        raise ValueError(f"method {method!r} is data-driven and needs batches= and loss_fn=; missing: {missing}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError(f"method {method!r} needs at least one batch, got none")
    return batches


def _loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    if not torch.isfinite(loss).all():
        raise ValueError(f"loss_fn returned a non-finite loss: {loss.item()}")
    return loss.reshape(())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; each module's own training flag restored after.

    Example:
        >>> m = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
        >>> with eval_mode(m):
        ...     m.training
        False
        >>> m.training
        True
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# -- magnitude -----------------------------------------------------------------------------------
def _magnitude(layer: nn.Module) -> Tensor:
    c = layer.config
    d, to_kv = c.head_dim, c.query_to_kv()
    with torch.no_grad():
        q = layer.q_proj.weight.detach().float().view(c.num_heads, d, -1)  # (h, d, D)
        o = layer.o_proj.weight.detach().float().view(-1, c.num_heads, d)  # (D, h, d)
        k = layer.k_proj.weight.detach().float().view(c.num_kv_heads, d, -1)  # (h_kv, d, D)
        v = layer.v_proj.weight.detach().float().view(c.num_kv_heads, d, -1)  # (h_kv, d, D)
        kv = k.flatten(1).norm(dim=1) + v.flatten(1).norm(dim=1)  # (h_kv,)
        group = torch.bincount(torch.tensor(to_kv), minlength=c.num_kv_heads).to(kv)  # (h_kv,)
        index = torch.tensor(to_kv, device=kv.device)
        score = q.flatten(1).norm(dim=1) + o.transpose(0, 1).flatten(1).norm(dim=1) + (kv / group)[index]
    return score.cpu()


# -- ablation ------------------------------------------------------------------------------------
def _zero_head(start: int, stop: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[..., start:stop] = 0
        return (x, *args[1:])
    return hook


def _mean_loss(model: nn.Module, loss_fn: LossFn, batches: list[Any]) -> float:
    return sum(float(_loss(model, loss_fn, b)) for b in batches) / len(batches)


def _ablation(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any], loss_fn: LossFn) -> dict[str, Tensor]:
    scores = {}
    with eval_mode(model), torch.no_grad():
        base = _mean_loss(model, loss_fn, batches)
        for path, layer in layers.items():
            d, row = layer.config.head_dim, []
            for i in range(layer.config.num_heads):
                handle = layer.o_proj.register_forward_pre_hook(_zero_head(i * d, (i + 1) * d))
                try:
                    row.append(_mean_loss(model, loss_fn, batches) - base)
                finally:
                    handle.remove()
            scores[path] = torch.tensor(row, dtype=torch.float32)
    return scores


# -- taylor --------------------------------------------------------------------------------------
def _taylor(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any], loss_fn: LossFn) -> dict[str, Tensor]:
    totals = {p: torch.zeros(layer.config.num_heads, dtype=torch.float64) for p, layer in layers.items()}
    probes: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def capture(path: str) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            probe = torch.zeros_like(x, requires_grad=True)  # x + probe == x; dL/dprobe == dL/dx
            probes.setdefault(path, []).append((x.detach(), probe))
            return (x + probe, *args[1:])
        return hook

    handles = [layer.o_proj.register_forward_pre_hook(capture(p)) for p, layer in layers.items()]
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                probes.clear()
                loss = _loss(model, loss_fn, batch)
                seen = [(p, x, probe) for p, pairs in probes.items() for x, probe in pairs]
                if not seen or not loss.requires_grad:
                    raise ValueError("the loss does not depend on any headmods layer's output (is loss_fn "
                                     "running the model under torch.no_grad()?)")
                grads = torch.autograd.grad(loss, [probe for _, _, probe in seen], allow_unused=True)
                for (p, x, _), g in zip(seen, grads):
                    if g is None:
                        continue
                    h = layers[p].config.num_heads
                    prod = (g.double() * x.double()).reshape(-1, h, x.size(-1) // h)  # (tokens, h, d)
                    totals[p] += prod.sum(dim=(0, 2)).cpu()
    finally:
        for handle in handles:
            handle.remove()
        probes.clear()
    return {p: t.abs().float() for p, t in totals.items()}
