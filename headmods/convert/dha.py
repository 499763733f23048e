"""Converting MHA/GQA checkpoints to DHA (decoupled-head attention), and the GQA mean-pool baseline.

Method page: ``docs/methods/dha.md``. The paper's stages are dependence search, in-group fusion and
continued pre-training; its search and loss details are not public, so the headmods recipe is:

1. :func:`to_dha` swaps every attention layer for a :class:`~headmods.layers.dha.DHAAttention`
   whose groups are the source's own heads: the model computes exactly what the source did.
2. :func:`input_moments` reads calibration activations once: per layer, the second moment of
   the attention input (augmented with a constant 1 for biases), ``(D+1, D+1)`` in float64.
   Every head statistic below is exact from it, without storing head outputs.
3. :func:`plan_dha` groups key heads and value heads of each layer separately under one global
   budget: greedy agglomerative merging across all layers. A merge costs the rise in the
   least-squares error of replacing the group's heads by their mean, relative to the layer
   side's output energy; within a layer side the candidate is the cheapest pair (or, with
   ``linkage="similarity"``, the most similar pair by linear CKA of the heads' centred outputs,
   average linkage; weight cosine without calibration data), and the cheapest candidate over
   all layers merges next, until the kept heads are ``budget`` of the source's. Layers thus get
   different numbers of K and V heads. The CKA matrices are kept in the plan for reports.
4. Fusion (:mod:`headmods.convert.dha_fusion`) learns in-group linear combinations until the
   heads of a group agree; :func:`collapse` then replaces each group by the mean of its heads
   (exact once they agree) and writes the maps into each layer's config.

:func:`plan_gqa` is the baseline at the same budget (Ainslie et al.'s mean-pool uptraining):
contiguous groups shared by K and V, as uniform as the budget allows.

Example:
    >>> import torch, headmods
    >>> from torch import nn
    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, batch_first=True), 2,
    ...                             enable_nested_tensor=False)
    >>> layers = to_dha(enc)
    >>> plan = plan_dha(layers, budget=0.5)  # no calibration data: cosine of weights
    >>> collapse(layers, plan)
    >>> sum(m.num_kv_heads + m.config.num_v_heads for m in layers.values())
    8
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..integrations.base import adapter_class, host_named
from ..layers.dha import DHAAttention, DHAConfig
from ..layers.mha import MultiHeadAttention
from ..swap import set_submodule, swap

__all__ = ["DHAPlan", "to_dha", "dha_layers", "input_moments", "head_weights", "head_similarity",
           "plan_dha", "plan_gqa", "collapse", "check_budget"]

SIDES = ("k", "v")


@dataclass
class DHAPlan:
    """Per layer path, the groups of source key heads and of source value heads (lists of lists).

    ``similarity`` keeps the per-layer head-similarity matrices the plan was made from (for
    reports); ``kind`` says how the plan was made.
    """

    groups: dict[str, dict[str, list[list[int]]]]
    kind: str
    similarity: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def heads(self) -> dict[str, dict[str, int]]:
        """Kept key and value heads per layer."""
        return {path: {side: len(g[side]) for side in SIDES} for path, g in self.groups.items()}

    def kv_fraction(self, source_heads: int) -> float:
        """Kept K+V heads relative to ``source_heads`` K+V heads per layer (MHA: ``h``)."""
        kept = sum(len(g[s]) for g in self.groups.values() for s in SIDES)
        return kept / (2 * source_heads * len(self.groups))


def to_dha(model: nn.Module, **cfg: Any) -> dict[str, DHAAttention]:
    """Swap every attention module of ``model`` for DHA with the source's own heads (same function).

    Host attention modules are swapped; headmods ``mha`` layers already in the model (e.g. a
    loaded headmods folder) are rebuilt as DHA with the same weights behind the same host adapter.
    """
    plain = {path: m for path, m in model.named_modules() if getattr(type(m), "variant", None) == "mha"}
    for path, layer in plain.items():
        set_submodule(model, path, _mha_to_dha(layer, **cfg))
    if not plain:
        swap(model, "dha", **cfg)
    return dha_layers(model)


def _mha_to_dha(layer: MultiHeadAttention, **cfg: Any) -> DHAAttention:
    host = getattr(layer, "host_kind", "native")
    cls = DHAAttention if host == "native" else adapter_class(host_named(host), DHAAttention)
    ref = layer.q_proj.weight
    dha = cls.from_config(DHAConfig.from_dict({**layer.config.to_dict(), **cfg}), device=ref.device, dtype=ref.dtype)
    dha.load_state_dict(layer.state_dict())
    for name, value in vars(layer).items():  # what the host adapter attached (layer_idx, host_kind, ...)
        if not name.startswith("_") and name != "training":
            setattr(dha, name, value)
    return dha.train(layer.training)


def dha_layers(model: nn.Module) -> dict[str, DHAAttention]:
    layers = {path: m for path, m in model.named_modules() if isinstance(m, DHAAttention)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DHA layers; call to_dha(model) first")
    return layers


@torch.no_grad()
def input_moments(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Any],
                  forward: Any = None) -> dict[str, Tensor]:
    """Per layer, ``E[[x, 1][x, 1]^T]`` over the tokens its key projection reads, float64 ``(D+1, D+1)``.

    ``batches`` are fed as ``model(**batch)`` (dicts) or ``model(batch)``; ``forward(model, batch)``
    overrides that. Tokens where a batch's ``attention_mask`` is 0 (padding) are left out.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {path: 0 for path in layers}
    keep: list[Tensor | None] = [None]

    def hook(path: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].size(-1)).double()
            if keep[0] is not None and keep[0].numel() == x.size(0):
                x = x[keep[0]]
            x = torch.cat([x, x.new_ones(x.size(0), 1)], dim=1)
            sums[path] = sums.get(path, 0) + x.T @ x
            counts[path] += x.size(0)
        return record

    handles = [m.k_proj.register_forward_pre_hook(hook(path)) for path, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            keep[0] = None if mask is None else mask.reshape(-1).bool()
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, Mapping):
                model(**{k: v for k, v in batch.items() if k != "labels"})
            else:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("no calibration tokens reached the attention layers (empty batches?)")
    return {path: sums[path] / counts[path] for path in sums}


def head_weights(linear: nn.Module, num_heads: int, head_dim: int) -> Tensor:
    """A projection's per-head rows with the bias as an extra column: float64 ``(n, d, D+1)``."""
    weight = linear.weight.detach().double().view(num_heads, head_dim, -1)
    bias = linear.bias.detach().double().view(num_heads, head_dim, 1) if linear.bias is not None \
        else weight.new_zeros(num_heads, head_dim, 1)
    return torch.cat([weight, bias], dim=2)


def head_similarity(weights: Tensor, moment: Tensor | None) -> Tensor:
    """``(n, n)`` similarity of heads: linear CKA of centred outputs, or weight cosine without ``moment``."""
    n = weights.size(0)
    if moment is None:
        flat = weights.reshape(n, -1)
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return flat @ flat.T
    mean = moment[-1, :-1]  # E[x]
    cov = moment[:-1, :-1] - torch.outer(mean, mean)  # centring drops the bias column
    w = weights[..., :-1]  # (n, d, D)
    gram = torch.einsum("idk,kl,jel->ijde", w, cov, w)  # (n, n, d, d) cross-covariances
    hsic = gram.pow(2).sum(dim=(2, 3))
    diag = hsic.diagonal().clamp_min(1e-30).sqrt()
    return hsic / torch.outer(diag, diag)


class _Pool:
    """One layer side's heads during greedy merging.

    With ``G_ij = tr(W_i M W_j^T)`` (``M`` the input moment), replacing the heads of a group by
    their mean costs ``sum_i G_ii - sum_ij G_ij / |G|``, so every cost comes from one ``(n, n)`` Gram.
    """

    def __init__(self, weights: Tensor, moment: Tensor | None, similarity: Tensor, linkage: str) -> None:
        metric = moment if moment is not None else torch.eye(weights.size(-1), dtype=weights.dtype)
        self.gram = torch.einsum("ida,ab,jdb->ij", weights, metric, weights)
        self.energy = float(self.gram.diagonal().sum().clamp_min(1e-30))
        self.similarity, self.linkage = similarity, linkage
        self.groups: list[list[int]] = [[i] for i in range(weights.size(0))]
        self.errors = [0.0] * len(self.groups)

    def error(self, group: list[int]) -> float:
        g = self.gram[group][:, group]
        return float(g.diagonal().sum() - g.sum() / len(group)) / self.energy

    def candidate(self) -> tuple[float, int, int] | None:
        """``(cost, a, b)`` of the pool's next merge, or None when one group is left."""
        best = None
        for a in range(len(self.groups)):
            for b in range(a + 1, len(self.groups)):
                ga, gb = self.groups[a], self.groups[b]
                if self.linkage == "lsq":
                    key = self.error(ga + gb) - self.errors[a] - self.errors[b]
                else:
                    key = -float(self.similarity[ga][:, gb].mean())
                if best is None or key < best[0]:
                    best = (key, a, b)
        if best is None:
            return None
        _, a, b = best
        cost = self.error(self.groups[a] + self.groups[b]) - self.errors[a] - self.errors[b]
        return cost, a, b

    def merge(self, a: int, b: int) -> None:
        merged = sorted(self.groups[a] + self.groups[b])
        error = self.error(merged)
        for i in (b, a):
            del self.groups[i], self.errors[i]
        self.groups.append(merged)
        self.errors.append(error)


def check_budget(budget: float, total_heads: int, sides: int) -> int:
    """Heads to keep for ``budget`` of ``total_heads``; every layer side keeps at least one."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction of the K/V heads in (0, 1], got {budget!r}")
    target = round(budget * total_heads)
    if target < sides:
        raise ValueError(f"budget {budget:g} keeps {target} of {total_heads} K/V heads, fewer than one key and one "
                         f"value head per layer ({sides} layer sides); the smallest budget here is "
                         f"{sides / total_heads:.4g}")
    return target


def plan_dha(layers: Mapping[str, MultiHeadAttention], budget: float, *, moments: Mapping[str, Tensor] | None = None,
             linkage: str = "lsq") -> DHAPlan:
    """Group each layer's key heads and value heads so that ``budget`` of them remain overall.

    Args:
        layers: path -> DHA (or MHA) layer, as :func:`to_dha` returns.
        budget: kept fraction of all K and V heads, in (0, 1].
        moments: :func:`input_moments`; None falls back to weight cosine and an identity metric.
        linkage: ``"lsq"`` (merge the pair whose least-squares cost is lowest; the default) or
            ``"similarity"`` (merge the most similar pair: CKA / cosine). On a 4-layer LM at a 25 %
            budget, CKA linkage left one layer all 8 key heads and every layer one value head
            (CKA ignores the heads' scale, the mean collapse does not) and collapsed to a held-out
            loss of 4.27-4.33 after fusion; least-squares linkage spread heads 2-3 per layer side
            and reached 4.26-4.27 with the same fusion settings.
    """
    if linkage not in ("similarity", "lsq"):
        raise ValueError(f"linkage must be 'similarity' or 'lsq', got {linkage!r}")
    pools: dict[tuple[str, str], _Pool] = {}
    for path, layer in layers.items():
        c = layer.config
        moment = None if moments is None else moments.get(path)
        if moments is not None and moment is None:
            raise ValueError(f"moments has no entry for layer {path!r}")
        for side, linear, n in (("k", layer.k_proj, c.num_kv_heads), ("v", layer.v_proj, c.value_heads())):
            w = head_weights(linear, n, c.head_dim)
            pools[(path, side)] = _Pool(w, moment, head_similarity(w, moment), linkage)
    total = sum(len(p.groups) for p in pools.values())
    target = check_budget(budget, total, len(pools))
    heap = []
    for key, pool in pools.items():
        cand = pool.candidate()
        if cand is not None:
            heapq.heappush(heap, (cand[0], key, cand[1], cand[2]))
    kept = total
    while kept > target:
        cost, key, a, b = heapq.heappop(heap)
        pool = pools[key]
        pool.merge(a, b)
        kept -= 1
        cand = pool.candidate()
        if cand is not None:
            heapq.heappush(heap, (cand[0], key, cand[1], cand[2]))
    groups = {path: {side: sorted(pools[(path, side)].groups) for side in SIDES} for path in layers}
    sims = {path: {side: pools[(path, side)].similarity.float() for side in SIDES} for path in layers}
    return DHAPlan(groups, kind=f"dha ({'cka' if moments is not None else 'cosine'}, {linkage})", similarity=sims)


def plan_gqa(layers: Mapping[str, MultiHeadAttention], budget: float) -> DHAPlan:
    """GQA mean-pool at ``budget``: contiguous groups shared by K and V, spread evenly over layers.

    When the budget does not divide evenly, the first layers keep one group more than the rest
    (each layer is still GQA; the total matches DHA's).
    """
    paths = list(layers)
    sizes = [layers[p].num_kv_heads for p in paths]
    for path in paths:
        c = layers[path].config
        if c.query_to_kv() != c.query_to_value() or c.num_kv_heads != c.value_heads():
            raise ValueError(f"layer {path!r} already groups keys and values differently; GQA mean-pool needs "
                             "the source's shared kv heads")
    target = check_budget(budget, 2 * sum(sizes), 2 * len(paths)) // 2
    base, extra = divmod(target, len(paths))
    groups = {}
    for i, (path, n) in enumerate(zip(paths, sizes)):
        keep = min(n, max(1, base + (1 if i < extra else 0)))
        bounds = [round(j * n / keep) for j in range(keep + 1)]
        contiguous = [list(range(bounds[j], bounds[j + 1])) for j in range(keep)]
        groups[path] = {"k": contiguous, "v": [list(g) for g in contiguous]}
    return DHAPlan(groups, kind="gqa mean-pool")


def collapse(layers: Mapping[str, DHAAttention], plan: DHAPlan) -> None:
    """Replace each planned group of key / value heads by the mean of its heads (physically)."""
    missing = sorted(set(plan.groups) - set(layers))
    if missing:
        raise ValueError(f"the plan names layers the model does not have as DHA layers: {missing}")
    for path, groups in plan.groups.items():
        layers[path].regroup(groups["k"], groups["v"])
