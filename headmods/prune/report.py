"""``PruneReport``: what a structural prune changed, per layer and for the whole model.

Rows cover every prunable headmods layer of the model (untouched ones too). Kept indices are
``layer.config.kept_heads``: the *original* index of each remaining head, across repeated prunes
(all heads when the layer was never pruned). MACs are None without example inputs, latency None
unless it was measured.

Example:
    >>> row = LayerRow("blocks.0.attn", 4, 2, 2, 1, (0, 1))
    >>> report = PruneReport([row], params_before=100, params_after=80,
    ...                      attn_params_before=40, attn_params_after=20)
    >>> report.to_dict()["layers"][0]["kept_heads"]
    [0, 1]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerRow", "PruneReport"]


@dataclass(frozen=True)
class LayerRow:
    """One attention layer before and after pruning.

    Example:
        >>> LayerRow("attn", 4, 3, 4, 3, (0, 2, 3)).heads_after
        3
    """

    path: str
    heads_before: int
    heads_after: int
    kv_heads_before: int
    kv_heads_after: int
    kept_heads: tuple[int, ...]


@dataclass
class PruneReport:
    """Before/after numbers of a structural prune (:func:`headmods.prune.prune_heads`).

    Attributes:
        layers: one :class:`LayerRow` per prunable headmods layer, in module order.
        params_before, params_after: parameters of the whole model.
        attn_params_before, attn_params_after: parameters inside the headmods attention layers.
        macs_before, macs_after: multiply-accumulates of one forward on the example inputs
            (:func:`headmods.prune.count_macs`); None without example inputs.
        latency_ms_before, latency_ms_after: median ms of one forward; None unless measured.
        latency_ratio: median over rounds of after / before, timed alternately; None unless measured.
        plan: the applied plan (:meth:`HeadPrunePlan.to_dict`), when known.

    Example:
        >>> r = PruneReport([], params_before=10, params_after=8, attn_params_before=4, attn_params_after=2)
        >>> print(r.to_markdown().splitlines()[0])
        | layer | heads | kv heads | kept heads |
    """

    layers: list[LayerRow]
    params_before: int
    params_after: int
    attn_params_before: int
    attn_params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    latency_ratio: float | None = None
    plan: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (lists for tuples, plain ints and floats, None where not measured).

        Example:
            >>> import json
            >>> r = PruneReport([LayerRow("a", 2, 1, 2, 1, (1,))], params_before=9, params_after=5,
            ...                 attn_params_before=8, attn_params_after=4)
            >>> json.loads(json.dumps(r.to_dict()))["params_after"]
            5
        """
        data = dataclasses.asdict(self)
        data["layers"] = [{**row, "kept_heads": list(row["kept_heads"])} for row in data["layers"]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneReport":
        """Rebuild a report from :meth:`to_dict` output.

        Example:
            >>> r = PruneReport([LayerRow("a", 2, 1, 2, 1, (1,))], 9, 5, 8, 4)
            >>> PruneReport.from_dict(r.to_dict()) == r
            True
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PruneReport has no fields {unknown}; known fields: {sorted(known)}")
        rows = [LayerRow(**{**row, "kept_heads": tuple(row["kept_heads"])}) for row in data.get("layers", [])]
        return cls(**{**data, "layers": rows})

    def to_markdown(self) -> str:
        """Per-layer table, then a before/after/change table of parameters, MACs and latency.

        Example:
            >>> r = PruneReport([LayerRow("a", 2, 1, 2, 1, (1,))], 9, 5, 8, 4)
            >>> "| a | 2 → 1 | 2 → 1 | 1 |" in r.to_markdown()
            True
        """
        lines = ["| layer | heads | kv heads | kept heads |", "|---|---:|---:|---|"]
        for row in self.layers:
            lines.append(f"| {row.path} | {row.heads_before} → {row.heads_after} | "
                         f"{row.kv_heads_before} → {row.kv_heads_after} | {', '.join(map(str, row.kept_heads))} |")
        lines += ["", "| | before | after | after / before |", "|---|---:|---:|---:|"]
        lines.append(_total_row("parameters", self.params_before, self.params_after))
        lines.append(_total_row("attention parameters", self.attn_params_before, self.attn_params_after))
        if self.macs_before is not None and self.macs_after is not None:
            lines.append(_total_row("MACs", self.macs_before, self.macs_after))
        if self.latency_ms_before is not None and self.latency_ms_after is not None:
            ratio = "n/a" if self.latency_ratio is None else f"{self.latency_ratio:.3f}"
            lines.append(f"| latency (median ms) | {self.latency_ms_before:.3f} | {self.latency_ms_after:.3f} | "
                         f"{ratio} |")
        return "\n".join(lines)


def _total_row(name: str, before: int, after: int) -> str:
    ratio = "n/a" if before == 0 else f"{after / before:.3f}"
    return f"| {name} | {before:,} | {after:,} | {ratio} |"
