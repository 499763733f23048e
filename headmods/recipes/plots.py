"""PNG plots for run reports: loss curves, head importance, accuracy against size, latency.

Every function draws on its own ``matplotlib.figure.Figure`` attached to an Agg canvas (no
``pyplot``, so no global backend or figure registry is touched), renders the PNG in memory and
writes it atomically with :func:`write_atomic`. matplotlib is imported inside the functions,
so importing this module stays cheap.

Example:
    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = plot_curves(pathlib.Path(d) / "loss.png", {"train": [(0, 2.3), (10, 1.1)]}, title="Loss")
    ...     p.name, p.stat().st_size > 1000
    ('loss.png', True)
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import write_atomic  # re-exported: it moved to headmods.io.atomic

__all__ = ["plot_curves", "plot_heatmap", "plot_latency", "plot_tradeoff", "short_labels", "write_atomic"]

_DPI = 100


def short_labels(names: Sequence[str], *, max_len: int = 24) -> list[str]:
    """Shorten dotted module paths by dropping the components they all share at both ends.

    Every label keeps at least one component, so distinct names stay distinct; a lone name
    keeps its last component. Labels longer than ``max_len`` keep their tail after an ellipsis.

    Example:
        >>> short_labels(["enc.layer.0.attn", "enc.layer.1.attn", "enc.layer.10.attn"])
        ['0', '1', '10']
        >>> short_labels(["model.encoder.0.attn", "model.decoder.0.attn"])
        ['encoder', 'decoder']
    """
    parts = [str(n).split(".") for n in names]
    if not parts:
        return []
    shortest = min(len(p) for p in parts)
    prefix = 0
    while prefix < shortest - 1 and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix - 1 and len({p[-1 - suffix] for p in parts}) == 1:
        suffix += 1
    labels = [".".join(p[prefix:len(p) - suffix]) for p in parts]
    return [lab if len(lab) <= max_len else "…" + lab[-(max_len - 1):] for lab in labels]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return write_atomic(path, buf.getvalue())


def plot_curves(path: str | os.PathLike, curves: Mapping[str, Sequence[tuple[int, float]]], *,
                title: str, xlabel: str = "step", ylabel: str = "loss") -> Path:
    """One line per named curve of ``(step, value)`` points (e.g. train loss, val loss, stages).

    Points are drawn in step order; curves without points are left out (at least one needs some).

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = plot_curves(pathlib.Path(d) / "c.png",
        ...                     {"finetune": [(0, 2.0), (5, 1.0)], "recover": [(5, 1.4), (9, 0.9)]},
        ...                     title="Loss")
        ...     p.read_bytes()[1:4]
        b'PNG'
    """
    drawn = {name: sorted((int(s), float(v)) for s, v in pts) for name, pts in curves.items() if len(pts)}
    if not drawn:
        raise ValueError("plot_curves needs at least one curve with points")
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for name, pts in drawn.items():
        steps, values = zip(*pts)
        ax.plot(steps, values, label=name, marker="o" if len(pts) <= 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_heatmap(path: str | os.PathLike, scores: Mapping[str, Sequence[float]], *, title: str,
                 cbar_label: str, marks: Mapping[str, Sequence[int]] | None = None, xlabel: str = "head",
                 ylabel: str = "layer", columns: Sequence[str] | None = None,
                 limits: tuple[float, float] | None = None) -> Path:
    """A layers × heads heatmap; rows follow ``scores`` order, labelled by :func:`short_labels`.

    Layers with fewer heads are padded with NaN, drawn blank. ``marks`` outlines the given head
    indices of a layer (e.g. the heads a prune kept) with a red box. Other grids (e.g. passkey
    accuracy by length x depth) set ``xlabel``/``ylabel``, ``columns`` (tick labels) and
    ``limits`` (a fixed colour range), and write each cell's value.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = plot_heatmap(pathlib.Path(d) / "h.png", {"l.0": [0.1, 0.9, 0.5], "l.1": [0.7, 0.2]},
        ...                      title="Head importance", cbar_label="score", marks={"l.0": [1, 2]})
        ...     p.stat().st_size > 1000
        True
    """
    import numpy as np
    from matplotlib.patches import Patch, Rectangle

    rows = [[float(v) for v in vals] for vals in scores.values()]
    if not rows or not any(rows):
        raise ValueError("plot_heatmap needs at least one layer with scores")
    names = list(scores)
    n_heads = max(len(r) for r in rows)
    grid = np.full((len(rows), n_heads), np.nan)
    for i, r in enumerate(rows):
        grid[i, :len(r)] = r
    for name, heads in (marks or {}).items():
        if name not in scores:
            raise ValueError(f"marks names layer {name!r}, which has no scores")
        bad = [h for h in heads if not 0 <= int(h) < len(rows[names.index(name)])]
        if bad:
            raise ValueError(f"marks for {name!r} name heads {bad} outside 0..{len(rows[names.index(name)]) - 1}")

    fig = _figure(min(16.0, 3.0 + 0.4 * n_heads), min(14.0, 1.6 + 0.35 * len(rows)))
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if limits is not None:
        vmin, vmax = limits
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                      cmap="viridis", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label=cbar_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_yticks(range(len(rows)), short_labels(names))
    if columns is not None:
        ax.set_xticks(range(len(columns)), [str(c) for c in columns])
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", color="white" if value < (vmin + vmax) / 2
                        else "black", fontsize=8)
    elif n_heads <= 32:
        ax.set_xticks(range(n_heads))
    for name, heads in (marks or {}).items():
        row = names.index(name)
        for h in heads:
            ax.add_patch(Rectangle((int(h) - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    if marks:
        fig.legend(handles=[Patch(fill=False, edgecolor="red", label="kept head")],
                   loc="outside lower left", frameon=False)
    return _save(fig, path)


def plot_tradeoff(path: str | os.PathLike, points: Sequence[Mapping[str, Any]], *, x: str = "params",
                  y: str = "accuracy", title: str) -> Path:
    """Scatter of ``points[i][x]`` against ``points[i][y]``, each labelled with its ``"label"``.

    The x axis is shown in millions when the largest x is at least a million.

    Example:
        >>> import pathlib, tempfile
        >>> pts = [{"label": "fine-tuned", "params": 22_713_216, "accuracy": 0.97},
        ...        {"label": "pruned", "params": 18_000_000, "accuracy": 0.95}]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     plot_tradeoff(pathlib.Path(d) / "t.png", pts, title="Accuracy vs size").exists()
        True
    """
    if not points:
        raise ValueError("plot_tradeoff needs at least one point")
    missing = [i for i, p in enumerate(points) if x not in p or y not in p]
    if missing:
        raise ValueError(f"points {missing} lack {x!r} or {y!r}")
    xs = [float(p[x]) for p in points]
    ys = [float(p[y]) for p in points]
    scale = 1e6 if max(abs(v) for v in xs) >= 1e6 else 1.0
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    ax.scatter([v / scale for v in xs], ys, zorder=3)
    for i, (p, xv, yv) in enumerate(zip(points, xs, ys)):
        ax.annotate(str(p.get("label", i)), (xv / scale, yv), textcoords="offset points",
                    xytext=(5, 5), fontsize=9)
    ax.set(title=title, xlabel=f"{x} (millions)" if scale != 1.0 else x, ylabel=y)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    return _save(fig, path)


def plot_latency(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *, title: str) -> Path:
    """Horizontal bars of ``{"label", "ms"}`` rows, first row on top, each with its ratio to it.

    Example:
        >>> import pathlib, tempfile
        >>> rows = [{"label": "dense", "ms": 12.5}, {"label": "pruned", "ms": 8.0}]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     plot_latency(pathlib.Path(d) / "l.png", rows, title="Latency").exists()
        True
    """
    if not rows:
        raise ValueError("plot_latency needs at least one row")
    labels = [str(r.get("label", i)) for i, r in enumerate(rows)]
    ms = [float(r["ms"]) for r in rows]
    fig = _figure(7, 1.4 + 0.45 * len(rows))
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), ms, color="tab:blue")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(ms):
        ratio = v / ms[0] if ms[0] and math.isfinite(ms[0]) else math.nan
        text = f"{v:.4g} ms" + ("" if math.isnan(ratio) else f"  ({ratio:.4g}×)")
        ax.annotate(text, (v if math.isfinite(v) else 0.0, i), textcoords="offset points",
                    xytext=(4, 0), va="center", fontsize=9)
    top = max((v for v in ms if math.isfinite(v)), default=1.0)
    ax.set_xlim(0, (top or 1.0) * 1.4)
    ax.set(title=title, xlabel="ms")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
