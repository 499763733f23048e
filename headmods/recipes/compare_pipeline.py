"""The ``compare`` recipe: variants trained from the same random init per seed, at equal steps.

Per seed and variant: a fresh ``model.scratch`` model (the same weights for every variant of a
seed), the variant swapped in (its projections copied from those weights), its ``positions`` set
(:mod:`headmods.recipes.positions`: host RoPE, learned absolute embeddings, or none),
``train.max_steps`` steps on the same batches, then the whole validation split: loss, perplexity
and, for language models, next-token accuracy. During training the validation loss on the first
``compare.eval_batches`` batches, at the start, every ``compare.eval_every`` steps and at the
end, gives one curve per variant (the mean over seeds), plotted against the training step.

The summary has per variant the means over seeds, the parameter count and its difference from
the first variant (the report gets a note when one differs by more than
``compare.param_tolerance``), the relative validation loss and the next-token accuracy
difference against the first variant. The compared models are not saved: a variant with
``positions: none | absolute`` is not something a headmods checkpoint records.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import lightning as L
from torch import Tensor

from ..swap import swap
from .dha_pipeline import HeldOutCurve
from .positions import set_positions
from .report import markdown_table

if TYPE_CHECKING:
    from .runner import RecipeRun

__all__ = ["StepCurve", "run_compare", "compare_summary", "param_warnings", "mean_curve"]

ACCURACY = "val_token_accuracy"


class StepCurve(HeldOutCurve):
    """Held-out loss on fixed batches against the training step, at the start, every ``every``
    steps and at the end; the points are callback state, so a resumed fit keeps the earlier ones."""

    def __init__(self, batches: list[dict[str, Tensor]], every: int) -> None:
        super().__init__(batches, every, tokens_per_step=1, offset_steps=0, record=self._add)
        self.points: list[list[float]] = []

    def _point(self, module: Any, step: int) -> None:
        if self.points and self.points[-1][0] == step:
            return  # gradient accumulation: several batches end on the same optimizer step
        super()._point(module, step)

    def _add(self, step: int, loss: float) -> None:
        self.points.append([int(step), float(loss)])

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = [list(p) for p in state.get("points", [])]


def run_compare(run: "RecipeRun") -> bool:
    """Train and evaluate every variant of ``run.config.compare`` per seed; False on non-zero ranks."""
    from .scratch import parse_tokenizer_spec

    cfg = run.config
    run.dm = run.data(parse_tokenizer_spec(cfg.model.tokenizer))
    batches = list(itertools.islice(iter(run.dm.val_dataloader()), cfg.compare.eval_batches))
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[list[list[float]]]] = {}
    for seed in cfg.compare.seeds:
        for name, spec in cfg.compare.variants.items():
            result = _train_variant(run, name, spec, seed, batches)
            if result is None:
                return False
            metrics, points = result
            rows.append({"variant": name, "seed": seed, **metrics})
            curves.setdefault(name, []).append(points)
    _report(run, rows, curves)
    return True


def _train_variant(run: "RecipeRun", name: str, spec: dict[str, Any], seed: int,
                   batches: list[dict[str, Tensor]]) -> tuple[dict[str, float], list[list[float]]] | None:
    """One variant at one seed: build, train, evaluate; its metrics and curve (None on non-zero ranks)."""
    from .scratch import scratch_model

    cfg = run.config
    L.seed_everything(seed, workers=True, verbose=False)
    model = scratch_model(cfg.model.scratch, run.dm.tokenizer)
    swap(model, spec["variant"], **spec.get("variant_config", {}))
    set_positions(model, spec.get("positions", "rope"), name=name)
    stage = f"{name}-seed{seed}"
    curve = StepCurve(batches, cfg.compare.eval_every)
    if not run.train(model, stage, cfg.train.max_steps, callbacks=(curve,)):
        return None
    return run.evaluate(model, stage), curve.points


def compare_summary(rows: list[dict[str, Any]], variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (in ``variants`` order): means over seeds, parameters, differences from the first.

    Example:
        >>> rows = [{"variant": "a", "seed": 0, "val_loss": 2.0, "params": 100},
        ...         {"variant": "b", "seed": 0, "val_loss": 1.5, "params": 125}]
        >>> [(r["variant"], r["params vs a (%)"], r["val_loss vs a"]) for r in
        ...  compare_summary(rows, {"a": {"variant": "mha"}, "b": {"variant": "moh"}})]
        [('a', 0.0, 0.0), ('b', 25.0, -0.25)]
    """
    reference = next(iter(variants))
    summary = [_variant_row(name, spec, [r for r in rows if r["variant"] == name]) for name, spec in variants.items()]
    first = summary[0]
    for row in summary:
        row[f"params vs {reference} (%)"] = 100.0 * (row["params"] / first["params"] - 1)
        row[f"val_loss vs {reference}"] = row["mean val_loss"] / first["mean val_loss"] - 1
        if "mean next-token accuracy" in row:
            row[f"accuracy vs {reference} (points)"] = 100.0 * (row["mean next-token accuracy"]
                                                                - first["mean next-token accuracy"])
    return summary


def _variant_row(name: str, spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = {"variant": name, "layer": spec["variant"], "positions": spec.get("positions", "rope"), "seeds": len(runs),
           "mean val_loss": _mean(r["val_loss"] for r in runs)}
    if all(ACCURACY in r for r in runs):
        row["mean next-token accuracy"] = _mean(r[ACCURACY] for r in runs)
    row["params"] = runs[0]["params"]
    return row


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def param_warnings(summary: list[dict[str, Any]], tolerance: float) -> list[str]:
    """A sentence per variant whose parameter count differs from the first's by more than ``tolerance``.

    Example:
        >>> param_warnings([{"variant": "a", "params": 100, "params vs a (%)": 0.0},
        ...                 {"variant": "b", "params": 103, "params vs a (%)": 3.0}], 0.02)[0][:39]
        'b has 103 parameters, +3.00 % against a'
    """
    reference = summary[0]["variant"]
    column = f"params vs {reference} (%)"
    return [f"{row['variant']} has {row['params']:,} parameters, {row[column]:+.2f} % against {reference}'s "
            f"{summary[0]['params']:,}: more than the {100 * tolerance:g} % tolerance (compare.param_tolerance), so "
            "this is not a comparison at equal parameters" for row in summary if abs(row[column]) > 100 * tolerance]


def mean_curve(runs: list[list[list[float]]]) -> list[tuple[int, float]]:
    """The mean over seeds of ``(step, loss)`` curves, at the steps every seed has.

    Example:
        >>> mean_curve([[[0, 4.0], [10, 3.0]], [[0, 5.0], [10, 2.0], [20, 1.0]]])
        [(0, 4.5), (10, 2.5)]
    """
    by_step = [{int(step): float(loss) for step, loss in points} for points in runs]
    shared = sorted(set.intersection(*(set(points) for points in by_step))) if by_step else []
    return [(step, _mean(points[step] for points in by_step)) for step in shared]


def _report(run: "RecipeRun", rows: list[dict[str, Any]], curves: dict[str, list[list[list[float]]]]) -> None:
    cfg, report = run.config, run.report
    c = cfg.compare
    reference = next(iter(c.variants))
    summary = compare_summary(rows, c.variants)
    for row in summary:
        _summary_metrics(report, row, reference)
    for warning in param_warnings(summary, c.param_tolerance):
        report.notes.append(warning)
        run.log(f"[compare] warning: {warning}")
    report.held_out_x = "training step"
    for name, runs in curves.items():
        points = mean_curve(runs)
        if points:
            report.held_out[name] = points
            report.add_metric(f"compare_curves.{name}", [[step, loss] for step, loss in points])
    seeds = "the mean over seeds" if len(c.seeds) > 1 else "one seed"
    text = (f"Every variant starts from the same random init for each seed (the variant's projections copied from "
            f"it) and trains {cfg.train.max_steps} steps on the same batches. positions: rope = the host's RoPE, "
            "absolute = learned absolute position embeddings added to the token embeddings (no RoPE), none = no "
            f"host positions (only the layer's own terms). Relative val_loss = mean val_loss / {reference}'s - 1; "
            f"accuracy (next-token, over non-padding targets) against {reference} in percentage points; parameters "
            f"against {reference} in % (tolerance {100 * c.param_tolerance:g} %). Curves: validation loss on the first "
            f"{c.eval_batches} validation batches every {c.eval_every} steps ({seeds}); the tables use the whole "
            "validation split.")
    tables = markdown_table(summary) + "\n\nPer run:\n\n" + markdown_table(rows)
    report.add_section("Comparison", text + "\n\n" + tables)


def _summary_metrics(report: Any, row: dict[str, Any], reference: str) -> None:
    name = row["variant"]
    report.add_metric(f"compare.{name}.mean_val_loss", row["mean val_loss"])
    report.add_metric(f"compare.{name}.relative_to_{reference}", row[f"val_loss vs {reference}"])
    report.add_metric(f"compare.{name}.params", row["params"])
    report.add_metric(f"compare.{name}.params_relative_to_{reference}", row[f"params vs {reference} (%)"] / 100)
    if "mean next-token accuracy" in row:
        report.add_metric(f"compare.{name}.mean_{ACCURACY}", row["mean next-token accuracy"])
