"""Which heads to keep: ``HeadPrunePlan``, plans chosen from importance scores, and plan checks.

A plan names layers by their path in ``model.named_modules()`` and lists, per layer, the query
heads to keep as indices into the layer's *current* heads (so a plan applies to the model it was
scored on; after one prune, a second plan indexes the remaining heads). Layers a plan does not
name are left whole. Kv heads follow from the kept query heads (a kv head is removed when no kept
query head reads it); a plan may also state them in ``keep_kv``, and is then checked against that.

Example:
    >>> plan = plan_from_scores({"a": torch.tensor([0.1, 0.9, 0.5, 0.7])}, per_layer=2)
    >>> plan.keep
    {'a': (1, 3)}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.base import HeadAttention

__all__ = ["HeadPrunePlan", "plan_from_scores", "validate_plan", "prunable_layers"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def prunable_layers(model: nn.Module) -> dict[str, HeadAttention]:
    """Path -> layer for every headmods layer in ``model`` that can lose heads physically.

    A layer qualifies when it is a :class:`HeadAttention` with ``nn.Linear`` ``q_proj``, ``k_proj``,
    ``v_proj`` and ``o_proj`` and its own ``prune_heads`` (``MultiHeadAttention`` and subclasses,
    wherever they sit in the model). Other headmods layers are skipped.

    Example:
        >>> from headmods import MultiHeadAttention
        >>> list(prunable_layers(nn.Sequential(MultiHeadAttention(8, 2))))
        ['0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules()
            if isinstance(m, HeadAttention) and _is_prunable(m)}


def _is_prunable(layer: HeadAttention) -> bool:
    return (all(isinstance(getattr(layer, p, None), nn.Linear) for p in _PROJECTIONS)
            and type(layer).prune_heads is not HeadAttention.prune_heads)


def require_layers(model: nn.Module) -> dict[str, HeadAttention]:
    """:func:`prunable_layers`, raising when there are none (the message says what was found)."""
    layers = prunable_layers(model)
    if not layers:
        others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, HeadAttention)})
        found = f"only headmods layers without q/k/v/o projections or prune_heads: {others}" if others \
            else "no headmods HeadAttention layers"
        raise ValueError(f"{type(model).__name__} has no prunable headmods attention layers ({found}); "
                         "swap headmods layers in first (headmods.MultiHeadAttention or a subclass)")
    return layers


def _index_tuple(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    values = list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise TypeError(f"{name} must hold ints, got {values}")
    return tuple(sorted(values))


def _index_map(field_name: str, mapping: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"HeadPrunePlan.{field_name} must be a dict of layer path -> head indices, "
                        f"got {type(mapping).__name__}")
    out = {}
    for path, heads in mapping.items():
        if not isinstance(path, str):
            raise TypeError(f"HeadPrunePlan.{field_name} keys must be layer paths (str), got {path!r}")
        out[path] = _index_tuple(f"HeadPrunePlan.{field_name}[{path!r}]", heads)
    return out


@dataclass(frozen=True)
class HeadPrunePlan:
    """Per layer, the query heads (and optionally kv heads) to keep; indices are sorted on construction.

    Attributes:
        keep: layer path -> kept query heads, indices into the layer's current heads.
        keep_kv: optional layer path -> kept kv heads (indices into the current kv heads); when
            given, :func:`validate_plan` checks that it is exactly what ``keep`` implies.

    Types are checked here; values against a model in :func:`validate_plan`.

    Example:
        >>> plan = HeadPrunePlan({"layers.0.attn": [3, 0]})
        >>> plan.keep, HeadPrunePlan.from_dict(plan.to_dict()) == plan
        ({'layers.0.attn': (0, 3)}, True)
    """

    keep: dict[str, tuple[int, ...]]
    keep_kv: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", _index_map("keep", self.keep))
        if self.keep_kv is not None:
            object.__setattr__(self, "keep_kv", _index_map("keep_kv", self.keep_kv))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (lists for tuples).

        Example:
            >>> HeadPrunePlan({"a": (1,)}).to_dict()
            {'keep': {'a': [1]}, 'keep_kv': None}
        """
        kv = None if self.keep_kv is None else {k: list(v) for k, v in self.keep_kv.items()}
        return {"keep": {k: list(v) for k, v in self.keep.items()}, "keep_kv": kv}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HeadPrunePlan":
        """Rebuild a plan from :meth:`to_dict` output (e.g. read back from JSON).

        Example:
            >>> HeadPrunePlan.from_dict({"keep": {"a": [2, 0]}}).keep
            {'a': (0, 2)}
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"HeadPrunePlan.from_dict expects a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {"keep", "keep_kv"})
        if unknown or "keep" not in data:
            raise ValueError(f"a plan dict has the fields ['keep', 'keep_kv'] ('keep' required), "
                             f"got {sorted(data)}")
        return cls(data["keep"], data.get("keep_kv"))


def validate_plan(model: nn.Module, plan: HeadPrunePlan) -> None:
    """Check every entry of ``plan`` against ``model``; raise on the first problem, change nothing.

    Checks: known layer paths, at least one head kept per layer, indices in range and distinct;
    with ``keep_kv``: indices in range and distinct, no kept kv head without a kept query head
    reading it, and no kept query head whose kv head is dropped.

    Example:
        >>> from headmods import MultiHeadAttention
        >>> model = nn.Sequential(MultiHeadAttention(8, 2))
        >>> validate_plan(model, HeadPrunePlan({"0": (1,)}))
        >>> validate_plan(model, HeadPrunePlan({"0": ()}))
        Traceback (most recent call last):
        ...
        ValueError: plan would remove every head of layer '0' (it has 2); keep at least one
    """
    checked_layers(model, plan)


def checked_layers(model: nn.Module, plan: HeadPrunePlan) -> dict[str, HeadAttention]:
    """:func:`validate_plan`, returning the model's prunable layers (path -> layer)."""
    if not isinstance(plan, HeadPrunePlan):
        raise TypeError(f"expected a HeadPrunePlan, got {type(plan).__name__}")
    layers = require_layers(model)
    kv_paths = [] if plan.keep_kv is None else list(plan.keep_kv)
    for path in list(plan.keep) + kv_paths:
        if path not in layers:
            raise ValueError(f"plan names layer {path!r}, which is not a prunable headmods layer of the "
                             f"model; known layers: {list(layers)}")
    for path, keep in plan.keep.items():
        h = layers[path].config.num_heads
        if not keep:
            raise ValueError(f"plan would remove every head of layer {path!r} (it has {h}); keep at least one")
        _check_indices(f"kept heads of layer {path!r}", keep, h)
    for path, keep_kv in (plan.keep_kv or {}).items():
        c = layers[path].config
        _check_indices(f"kept kv heads of layer {path!r}", keep_kv, c.num_kv_heads)
        keep = plan.keep.get(path, tuple(range(c.num_heads)))
        to_kv = c.query_to_kv()
        read = {to_kv[i] for i in keep}
        for j in keep_kv:
            if j not in read:
                raise ValueError(f"plan would orphan kv head {j} of layer {path!r}: none of the kept query "
                                 f"heads {list(keep)} reads it (query head -> kv head: {list(to_kv)})")
        for i in keep:
            if to_kv[i] not in keep_kv:
                raise ValueError(f"plan keeps query head {i} of layer {path!r} but drops kv head {to_kv[i]}, "
                                 f"which it reads (kept kv heads: {list(keep_kv)})")
    return layers


def _check_indices(what: str, indices: Sequence[int], size: int) -> None:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(f"{what} must be in [0, {size}), got {list(indices)} (out of range: {bad})")
    dup = sorted({i for i in indices if indices.count(i) > 1})
    if dup:
        raise ValueError(f"{what} must be distinct, got {list(indices)} (repeated: {dup})")


# -- choosing heads from scores ------------------------------------------------------------------
def plan_from_scores(
    scores: Mapping[str, Tensor],
    *,
    ratio: float | None = None,
    per_layer: int | Mapping[str, int] | None = None,
    ignore: Sequence[str] = (),
    min_heads: int = 1,
    uniform: bool = False,
    normalize: bool = True,
    model: nn.Module | None = None,
) -> HeadPrunePlan:
    """Keep the highest-scoring heads: a global ``ratio`` of heads removed, or a count per layer.

    Args:
        scores: layer path -> ``(num_heads,)`` scores, higher = more important
            (:func:`~headmods.prune.head_importance`).
        ratio: fraction of all (non-ignored) query heads to remove, in ``[0, 1)``, rounded to the
            nearest head; the lowest scores across layers go first, never leaving a layer below
            ``min_heads`` (so fewer heads may be removed than asked).
        per_layer: heads to keep in every layer (int), or per layer path (dict; unnamed layers
            are left whole). Exactly one of ``ratio`` / ``per_layer``.
        ignore: layer paths, or prefixes of paths (``"blocks.0"`` covers ``"blocks.0.attn"``),
            left whole; each entry must match a layer.
        min_heads: fewest heads a layer keeps.
        uniform: the same kept count in every non-ignored layer (what HF export needs). GQA layers
            (fewer kv heads than heads) keep all their kv heads and the same number of query
            heads in each kv group, so the count must be a multiple of their kv heads; with
            ``ratio`` the count is rounded to the nearest such multiple. Needs ``model``.
        normalize: divide each layer's scores by their L2 norm before comparing across layers
            (Michel et al., 2019); only matters for ``ratio``.
        model: the model the scores are for; when given, scores are checked against its layers.

    Ties go to the lower head index. The plan lists every non-ignored layer, with all of its
    heads where none is removed.

    Example:
        >>> s = {"a": torch.tensor([1.0, 3.0, 2.0, 4.0]), "b": torch.tensor([9.0, 1.0])}
        >>> plan_from_scores(s, ratio=0.5).keep
        {'a': (1, 3), 'b': (0,)}
        >>> plan_from_scores(s, per_layer={"a": 3}).keep
        {'a': (1, 2, 3)}
    """
    scores = _check_scores(scores, model)
    if (ratio is None) == (per_layer is None):
        raise ValueError(f"give exactly one of ratio / per_layer, got ratio={ratio!r}, per_layer={per_layer!r}")
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 1:
        raise ValueError(f"min_heads must be an int >= 1, got {min_heads!r}")
    if uniform and model is None:
        raise ValueError("uniform=True needs model= (the model the scores are for) to know each layer's kv groups")
    active = _not_ignored(list(scores), ignore)
    groups = _kv_groups(model, active) if uniform else {}
    if per_layer is not None:
        counts = _per_layer_counts(per_layer, scores, active, min_heads, uniform)
    else:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        if uniform:
            counts = _uniform_ratio_counts(ratio, scores, active, min_heads, groups)
        else:
            return HeadPrunePlan(_global_ratio(ratio, scores, active, min_heads, normalize))
    if uniform:
        _check_uniform(counts, scores, groups)
    return HeadPrunePlan({p: _top(scores[p], n, groups.get(p)) for p, n in counts.items()})


def _check_scores(scores: Any, model: nn.Module | None) -> dict[str, Tensor]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"scores must be a non-empty dict of layer path -> (num_heads,) tensor, got {scores!r}")
    layers = require_layers(model) if model is not None else None
    out = {}
    for path, s in scores.items():
        s = torch.as_tensor(s).detach().to("cpu", torch.float64)
        if s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"scores of layer {path!r} must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores of layer {path!r} contain NaN or inf: {s.tolist()}")
        if layers is not None:
            if path not in layers:
                raise ValueError(f"scores name layer {path!r}, not a prunable layer of the model; "
                                 f"known layers: {list(layers)}")
            if s.numel() != layers[path].num_heads:
                raise ValueError(f"scores of layer {path!r} have {s.numel()} entries; the layer has "
                                 f"{layers[path].num_heads} heads")
        out[path] = s
    return out


def _not_ignored(paths: list[str], ignore: Sequence[str]) -> list[str]:
    if isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore):
        raise TypeError(f"ignore must be a sequence of layer paths or prefixes, got {ignore!r}")
    covered = set()
    for prefix in ignore:
        hits = {p for p in paths if p == prefix or p.startswith(prefix + ".")}
        if not hits:
            raise ValueError(f"ignore entry {prefix!r} matches no scored layer; layers: {paths}")
        covered |= hits
    return [p for p in paths if p not in covered]


def _kv_groups(model: nn.Module | None, active: list[str]) -> dict[str, tuple[int, ...]]:
    """Query head -> kv head of each active GQA layer (MHA layers are absent)."""
    if model is None:
        return {}
    layers = prunable_layers(model)
    groups = {}
    for p in active:
        c = layers[p].config
        if c.num_kv_heads < c.num_heads:
            groups[p] = c.query_to_kv()
    return groups


def _per_layer_counts(per_layer: Any, scores: dict[str, Tensor], active: list[str], min_heads: int,
                      uniform: bool) -> dict[str, int]:
    if isinstance(per_layer, Mapping):
        for p in per_layer:
            if p not in scores:
                raise ValueError(f"per_layer names layer {p!r}, which has no scores; layers: {list(scores)}")
            if p not in active:
                raise ValueError(f"per_layer names layer {p!r}, which ignore= leaves whole")
        counts = dict(per_layer)
        if uniform and len(set(counts.values())) > 1:
            raise ValueError(f"uniform=True needs the same count for every layer, got per_layer={counts}")
        if uniform and set(counts) != set(active):
            raise ValueError(f"uniform=True needs a count for every non-ignored layer {active}, "
                             f"got per_layer for {list(counts)}")
    else:
        counts = {p: per_layer for p in active}
    for p, n in counts.items():
        h = scores[p].numel()
        if isinstance(n, bool) or not isinstance(n, int) or not min_heads <= n <= h:
            raise ValueError(f"heads to keep in layer {p!r} must be an int in [min_heads={min_heads}, {h}], got {n!r}")
    return counts


def _global_ratio(ratio: float, scores: dict[str, Tensor], active: list[str], min_heads: int,
                  normalize: bool) -> dict[str, tuple[int, ...]]:
    ranked = []
    for order, p in enumerate(active):
        s = scores[p]
        norm = float(s.norm())
        if normalize and norm > 0:
            s = s / norm
        ranked += [(float(v), order, i) for i, v in enumerate(s.tolist())]
    to_remove = math.floor(ratio * len(ranked) + 0.5)
    kept = {p: set(range(scores[p].numel())) for p in active}
    for _, order, i in sorted(ranked):
        if to_remove == 0:
            break
        p = active[order]
        if len(kept[p]) > min_heads:
            kept[p].discard(i)
            to_remove -= 1
    return {p: tuple(sorted(k)) for p, k in kept.items()}


def _uniform_ratio_counts(ratio: float, scores: dict[str, Tensor], active: list[str], min_heads: int,
                          groups: dict[str, tuple[int, ...]]) -> dict[str, int]:
    if not active:
        return {}
    step = math.lcm(*(max(g) + 1 for g in groups.values())) if groups else 1
    total = sum(scores[p].numel() for p in active)
    target = (1.0 - ratio) * total / len(active)
    most = min(scores[p].numel() // step * step for p in active)  # every layer must hold n heads
    n = min(max(step, math.floor(target / step + 0.5) * step), most)
    n = max(n, math.ceil(min_heads / step) * step)  # min_heads wins; _check_uniform reports a misfit
    return {p: n for p in active}


def _check_uniform(counts: dict[str, int], scores: dict[str, Tensor], groups: dict[str, tuple[int, ...]]) -> None:
    for p, n in counts.items():
        h = scores[p].numel()
        if n > h:
            raise ValueError(f"uniform=True keeps {n} heads per layer, but layer {p!r} has only {h}")
        if p in groups:
            n_kv = max(groups[p]) + 1
            if n % n_kv:
                raise ValueError(f"uniform=True keeps the same heads per kv group, so the count must be a "
                                 f"multiple of {n_kv} (the kv heads of layer {p!r}), got {n}")
            smallest = min(groups[p].count(g) for g in range(n_kv))
            if n // n_kv > smallest:
                raise ValueError(f"uniform=True keeps {n // n_kv} heads per kv group, but a kv group of "
                                 f"layer {p!r} has only {smallest} query heads")


def _top(s: Tensor, n: int, kv_of_head: tuple[int, ...] | None) -> tuple[int, ...]:
    """The ``n`` highest-scoring heads (ties: lower index); per kv group when ``kv_of_head`` is given."""
    def best(heads: list[int], k: int) -> list[int]:
        return sorted(heads, key=lambda i: (-float(s[i]), i))[:k]

    if kv_of_head is None:
        return tuple(sorted(best(list(range(s.numel())), n)))
    n_kv = max(kv_of_head) + 1
    kept: list[int] = []
    for g in range(n_kv):
        kept += best([i for i, j in enumerate(kv_of_head) if j == g], n // n_kv)
    return tuple(sorted(kept))
