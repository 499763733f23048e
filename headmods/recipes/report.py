"""Run reports (``docs/design.md``, "Recipes"): one markdown file, a ``metrics.json`` and PNG plots in a folder.

A recipe fills a :class:`RunReport` as it goes (metrics by dotted path, curve points, sections
of markdown) and calls :meth:`RunReport.write` at the end. Every file is written atomically;
plots are drawn only for the data present (:mod:`headmods.recipes.plots`).

Numbers in tables are shown as given, not rounded away: ints with thousands separators, floats
to 4 significant digits (:func:`format_value`).

Example:
    >>> import pathlib, tempfile
    >>> report = RunReport("demo", command="headmods demo --out runs/demo")
    >>> report.add_metric("finetune.val_accuracy", 0.97)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     sorted(report.write(pathlib.Path(d)))
    ['metrics.json', 'report.md']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headmods.io.atomic import write_atomic
from headmods.recipes.plots import plot_curves, plot_heatmap, plot_latency, plot_tradeoff

__all__ = ["RunReport", "format_value", "markdown_table"]

_MAX_LIST_IN_SUMMARY = 8


def format_value(value: Any) -> str:
    """One table cell: ints with thousands separators, floats to 4 significant digits.

    Example:
        >>> [format_value(v) for v in (22_713_216, 0.97, 1 / 3, True, None, [0, 2])]
        ['22,713,216', '0.97', '0.3333', 'true', '', '0, 2']
    """
    value = _plain_scalar(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows``; columns default to every key, in first-seen order.

    Missing cells are blank; columns holding only numbers are right-aligned; ``|`` in cells is
    escaped. Values go through :func:`format_value`.

    Example:
        >>> print(markdown_table([{"model": "pruned", "params": 18_000_000, "acc": 0.95123}]))
        | model | params | acc |
        |---|---:|---:|
        | pruned | 18,000,000 | 0.9512 |
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""

    def numeric(col: str) -> bool:
        vals = [_plain_scalar(r[col]) for r in rows if r.get(col) is not None]
        return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(str(c)) for c in columns) + " |",
             "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(format_value(row.get(c))) for c in columns) + " |")
    return "\n".join(lines)


@dataclass
class RunReport:
    """Everything one run reports; :meth:`write` turns it into files.

    Attributes:
        title: the report's heading.
        command: the exact command line that ran (shown in a code block).
        config: the run's configuration, shown as YAML at the end.
        sections: ``(heading, markdown body)`` pairs, in order.
        metrics: nested JSON-able values, written exactly to ``metrics.json``.
        curves: named ``(step, value)`` series, plotted to ``loss.png``.
        held_out: named ``(training tokens, held-out loss)`` series, plotted to ``held_out.png``
            (comparisons at equal tokens, e.g. the DHA recipe).
        held_out_x: what the held-out series' x values count (``"training tokens"``; the compare
            recipe plots against ``"training step"``): the plot's x label and the section heading.
        grids: named value grids, each plotted to ``<name>.png``: ``{"title", "rows": {label:
            [values]}, "columns": [labels], "xlabel", "ylabel", "cbar"}`` (e.g. passkey accuracy).
        head_scores: per layer path, one score per head, plotted to ``head_importance.png``.
        kept_heads: per layer path, the head indices kept (outlined in the heatmap).
        tradeoff: points like ``{"label", "params", "accuracy"}``, plotted to ``tradeoff.png``.
        latency: rows like ``{"label", "ms"}``, plotted to ``latency.png``.
        notes: short remarks, listed after the summary.

    Example:
        >>> r = RunReport("run")
        >>> r.add_metric("prune.params", 18_000_000)
        >>> r.add_curve_point("train", 0, 2.5)
        >>> r.metrics, r.curves
        ({'prune': {'params': 18000000}}, {'train': [(0, 2.5)]})
    """

    title: str
    command: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    sections: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    held_out: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    held_out_x: str = "training tokens"
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    head_scores: dict[str, list[float]] | None = None
    head_usage: dict[str, list[float]] | None = None
    kept_heads: dict[str, list[int]] | None = None
    tradeoff: list[dict[str, Any]] = field(default_factory=list)
    latency: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_section(self, heading: str, body: str) -> None:
        """Append a ``## heading`` section with a markdown ``body``.

        Example:
            >>> r = RunReport("run"); r.add_section("Data", "2,000 examples"); r.sections
            [('Data', '2,000 examples')]
        """
        self.sections.append((heading, body))

    def add_metric(self, path: str, value: Any) -> None:
        """Set ``metrics`` at a dotted ``path``, creating the dicts on the way.

        Zero-dimensional tensors and numpy scalars are stored as Python numbers.

        Example:
            >>> r = RunReport("run"); r.add_metric("finetune.val_accuracy", 0.97); r.metrics
            {'finetune': {'val_accuracy': 0.97}}
        """
        keys = path.split(".")
        if not all(keys):
            raise ValueError(f"metric path {path!r} has an empty component")
        node = self.metrics
        for i, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"metric {'.'.join(keys[:i + 1])!r} is a value, not a group; cannot set {path!r}")
        node[keys[-1]] = _plain_scalar(value)

    def add_curve_point(self, name: str, step: int, value: float) -> None:
        """Append ``(step, value)`` to the curve ``name`` (created when new).

        Example:
            >>> r = RunReport("run"); r.add_curve_point("val", 100, 0.5); r.curves
            {'val': [(100, 0.5)]}
        """
        self.curves.setdefault(name, []).append((int(step), float(_plain_scalar(value))))

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``report.md``, ``metrics.json`` and the plots for the data present.

        Plots: ``loss.png`` (curves), ``head_importance.png`` (head scores, kept heads
        outlined), ``tradeoff.png`` and ``latency.png``. ``out_dir`` is created when missing.
        Metrics that would not come back equal from ``metrics.json`` (tuples, non-string keys,
        objects) are refused with a TypeError before anything is written.

        Returns:
            file name → path of every file written.

        Example:
            >>> import pathlib, tempfile
            >>> with tempfile.TemporaryDirectory() as d:
            ...     files = RunReport("empty").write(pathlib.Path(d) / "new")
            ...     sorted(files), files["report.md"].read_text().splitlines()[0]
            (['metrics.json', 'report.md'], '# empty')
        """
        _check_json(self.metrics, "metrics")
        metrics_text = json.dumps(self.metrics, sort_keys=True, indent=2) + "\n"
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plots = self._write_plots(out)
        files = {"report.md": out / "report.md", "metrics.json": out / "metrics.json"}
        write_atomic(files["metrics.json"], metrics_text.encode())
        write_atomic(files["report.md"], self.to_markdown(plots=set(plots)).encode())
        return {**files, **plots}

    def to_markdown(self, plots: set[str] | None = None) -> str:
        """The report's markdown; ``plots`` names the PNGs to link (by default those with data).

        Example:
            >>> print(RunReport("r", command="headmods eval").to_markdown())
            # r
            <BLANKLINE>
            ```sh
            headmods eval
            ```
            <BLANKLINE>
        """
        if plots is None:
            plots = set(self._plot_data())
        parts = [f"# {self.title}"]
        if self.command:
            parts.append(_fenced(self.command, "sh"))
        summary = [{"metric": k, "value": v} for k, v in _summary(self.metrics)]
        if summary:
            parts.append("## Summary\n\n" + markdown_table(summary) + "\n\nAll metrics: [metrics.json](metrics.json)")
        if self.notes:
            parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in self.notes))
        parts += [f"## {heading}\n\n{body.strip()}" for heading, body in self.sections]
        if "loss.png" in plots:
            parts.append("## Training curves\n\n![Training curves](loss.png)")
        if "held_out.png" in plots:
            parts.append(f"## Held-out loss against {self.held_out_x}\n\n![Held-out loss](held_out.png)")
        for name, grid in self.grids.items():
            if f"{name}.png" in plots:
                parts.append(f"## {grid['title']}\n\n![{grid['title']}]({name}.png)")
        if "head_importance.png" in plots or self.kept_heads:
            parts.append(self._heads_markdown("head_importance.png" in plots))
        if "head_usage.png" in plots:
            parts.append("## Head usage\n\nFraction of tokens routed to each routed head (usage EMA over the run's "
                         "forwards; 0 = never chosen).\n\n![Routed-head usage](head_usage.png)")
        if "tradeoff.png" in plots or self.tradeoff:
            img = "![Accuracy against parameters](tradeoff.png)\n\n" if "tradeoff.png" in plots else ""
            parts.append("## Accuracy against parameters\n\n" + img + markdown_table(self.tradeoff))
        if "latency.png" in plots or self.latency:
            img = "![Latency](latency.png)\n\n" if "latency.png" in plots else ""
            parts.append("## Latency\n\n" + img + markdown_table(_latency_rows(self.latency)))
        if self.config:
            parts.append("## Config\n\n" + _fenced(_yaml(self.config), "yaml"))
        return "\n\n".join(parts) + "\n"

    def _plot_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if any(self.curves.values()):
            data["loss.png"] = self.curves
        if any(self.held_out.values()):
            data["held_out.png"] = self.held_out
        for name, grid in self.grids.items():
            if grid.get("rows"):
                data[f"{name}.png"] = grid
        if self.head_scores and any(len(v) for v in self.head_scores.values()):
            data["head_importance.png"] = self.head_scores
        if self.head_usage and any(len(v) for v in self.head_usage.values()):
            data["head_usage.png"] = self.head_usage
        if self.tradeoff:
            data["tradeoff.png"] = self.tradeoff
        if self.latency:
            data["latency.png"] = self.latency
        return data

    def _write_plots(self, out: Path) -> dict[str, Path]:
        data = self._plot_data()
        written = {}
        if "loss.png" in data:
            written["loss.png"] = plot_curves(out / "loss.png", self.curves, title="Training curves")
        if "held_out.png" in data:
            written["held_out.png"] = plot_curves(out / "held_out.png", self.held_out, title="Held-out loss",
                                                  xlabel=self.held_out_x, ylabel="held-out loss")
        for name, grid in self.grids.items():
            if f"{name}.png" in data:
                written[f"{name}.png"] = plot_heatmap(
                    out / f"{name}.png", grid["rows"], title=grid["title"], cbar_label=grid.get("cbar", "value"),
                    xlabel=grid.get("xlabel", ""), ylabel=grid.get("ylabel", ""), columns=grid.get("columns"),
                    limits=grid.get("limits"))
        if "head_importance.png" in data:
            marks = {k: v for k, v in (self.kept_heads or {}).items() if k in self.head_scores}
            written["head_importance.png"] = plot_heatmap(out / "head_importance.png", self.head_scores,
                                                          title="Head importance", cbar_label="importance",
                                                          marks=marks or None)
        if "head_usage.png" in data:
            written["head_usage.png"] = plot_heatmap(out / "head_usage.png", self.head_usage,
                                                     title="Routed-head usage", cbar_label="fraction of tokens")
        if "tradeoff.png" in data:
            written["tradeoff.png"] = plot_tradeoff(out / "tradeoff.png", self.tradeoff,
                                                    title="Accuracy against parameters")
        if "latency.png" in data:
            written["latency.png"] = plot_latency(out / "latency.png", self.latency, title="Latency")
        return written

    def _heads_markdown(self, with_image: bool) -> str:
        text = "## Head importance\n\n"
        if with_image:
            text += "![Head importance per layer](head_importance.png)"
            if self.kept_heads:
                text += "\n\nBoxed cells are the kept heads."
        if self.kept_heads:
            scores = self.head_scores or {}
            rows = [{"layer": name, "heads": len(scores[name]) if name in scores else None,
                     "kept": len(kept), "kept heads": list(kept)} for name, kept in self.kept_heads.items()]
            text += ("\n\n" if with_image else "") + markdown_table(rows)
        return text


def _plain_scalar(value: Any) -> Any:
    """A 0-d tensor or numpy scalar as a Python number; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def _check_json(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has key {key!r}; metrics.json keys must be strings")
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float)):
        raise TypeError(f"{where} is a {type(value).__name__}; metrics.json holds only dicts, lists, "
                        "str, int, float, bool and None (tuples would come back as lists)")


def _summary(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Scalar leaves (and short lists) of the metrics, as dotted names."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _summary(value, name + ".")
        elif isinstance(value, list):
            if len(value) <= _MAX_LIST_IN_SUMMARY and not any(isinstance(v, (list, Mapping)) for v in value):
                yield name, value
        else:
            yield name, value


def _latency_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    first = float(rows[0]["ms"]) if rows else 0.0
    return [{"label": r.get("label", i), "ms": r["ms"],
             "ratio": float(r["ms"]) / first if first else None} for i, r in enumerate(rows)]


def _fenced(text: str, lang: str) -> str:
    run = longest = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip(chr(10))}\n{fence}"


def _yaml(config: Mapping[str, Any]) -> str:
    import yaml

    def plain(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k if isinstance(k, (str, int, float, bool)) else str(k): plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple, set, frozenset)):
            return [plain(v) for v in obj]
        obj = _plain_scalar(obj)
        return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)

    return yaml.safe_dump(plain(config), sort_keys=False, allow_unicode=True, default_flow_style=False)
