"""The SHRP recipe: convert, fine-tune with routing, prune by usage, recover, compare with MHA.

Stages (``recipe: shrp``; ``headmods demo`` runs it on MiniLM + BBC News):

1. optional baseline: the same source with plain ``mha`` fine-tuned with the same settings;
2. the source converted to ``shrp`` and fine-tuned with top-1 routing (temperature and
   load-balance annealing follow training progress);
3. usage measured on calibration samples (deterministic routing, eval mode);
4. a sweep over usage thresholds on copies: accuracy against parameters, no recovery (the curve);
5. the chosen threshold (plus optional dropping of attention sublayers that contribute little),
   a short recovery fine-tune, evaluation;
6. optional extreme setting: attention kept only in the ``extreme_keep_layers`` layers that
   contribute most, recovered, evaluated (the paper's "11 of 12 layers pruned" reading);
7. throughput of every model at ``bench`` shapes, and the report.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..layers.base import HeadAttention
from .config import ModelConfig
from .report import markdown_table

if TYPE_CHECKING:
    from .runner import RecipeRun

__all__ = ["run_shrp", "shrp_layers", "measure_usage", "attention_params"]


def shrp_layers(model: nn.Module) -> dict[str, HeadAttention]:
    return {path: m for path, m in model.named_modules() if isinstance(m, HeadAttention) and hasattr(m, "prune_by_usage")}


def attention_params(model: nn.Module) -> int:
    """Parameters inside headmods attention layers (projections, router, expander)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, HeadAttention) for p in m.parameters())


@torch.no_grad()
def measure_usage(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Reset every SHRP layer's usage and contribution statistics and measure them on ``batches``."""
    layers = shrp_layers(model)
    for layer in layers.values():
        layer.usage_ema.decay = layer.contribution_ema.decay = 1.0 - 1.0 / max(1, len(batches))
        for tracker in (layer.usage_ema, layer.contribution_ema):
            tracker.ema.zero_()
            tracker.steps = 0
    was = model.training
    model.eval()
    for batch in batches:  # equal-weight average over batches (bias-corrected EMA)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train(was)


def _prune(model: nn.Module, threshold: float, drop_below: float | None) -> dict[str, Any]:
    kept = {}
    for path, layer in shrp_layers(model).items():
        if layer.config.drop_attention:
            continue
        if drop_below is not None and float(layer.contribution) < drop_below:
            layer.drop_attention()
        else:
            layer.prune_by_usage(threshold, allow_drop=True)
        kept[path] = 0 if layer.config.drop_attention else layer.num_heads
    return kept


def _encoder(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def run_shrp(run: "RecipeRun") -> bool:
    cfg, s = run.config, run.config.shrp
    models: dict[str, nn.Module] = {}
    if s.baseline:
        base_cfg = ModelConfig(**{**cfg.model.__dict__, "variant": "mha", "variant_config": {}})
        from .build import build_model

        mha, _, _ = build_model(base_cfg, label_names=run.labels())
        if not run.train(mha, "mha-finetune", cfg.train.max_steps):
            return False
        models["mha"] = mha
        base = run.evaluate(mha, "mha")
    model, tokenizer, info = run._model()
    if not run.train(model, "shrp-finetune", cfg.train.max_steps):
        return False
    full = run.evaluate(model, "shrp")
    models["shrp (all heads)"] = copy.deepcopy(model)
    calib = run.dm.calibration_batches(min(cfg.prune.calib_samples, len(run.dm.train_dataset)))
    measure_usage(model, calib)
    run.usage(model)
    reference = base if s.baseline else full
    key = "val_accuracy" if "val_accuracy" in reference else "val_loss"
    points = []
    for threshold in s.sweep:
        trial = copy.deepcopy(model)
        kept = _prune(trial, threshold, None)
        metrics = run.evaluate(trial, "sweep.theta_" + f"{threshold:g}".replace(".", "p"))  # no dots in metric keys
        points.append({"label": f"theta={threshold:g}", "params": metrics["params"],
                       "accuracy" if key == "val_accuracy" else key: metrics[key],
                       "attention params": attention_params(trial), "heads kept": sum(kept.values())})
    kept = _prune(model, s.threshold, s.drop_below)
    run.report.add_metric("shrp.heads_kept", kept)
    pruned = run.evaluate(model, "shrp-pruned")
    if cfg.prune.recover_steps and not run.train(model, "shrp-recover", cfg.prune.recover_steps):
        return False
    final = run.evaluate(model, "shrp-recovered") if cfg.prune.recover_steps else pruned
    models[f"shrp pruned (theta={s.threshold:g})"] = model
    rows = [{"model": "mha (fine-tuned)", **_summary(base, models["mha"], key)}] if s.baseline else []
    rows += [{"model": "shrp, all heads", **_summary(full, models["shrp (all heads)"], key)},
             {"model": f"shrp, theta={s.threshold:g}, recovered", **_summary(final, model, key)}]
    if s.extreme_keep_layers is not None:
        extreme = _extreme(run, model, s.extreme_keep_layers)
        if extreme is None:
            return False
        models[f"shrp extreme ({s.extreme_keep_layers} attention layer)"] = extreme[0]
        rows.append({"model": f"shrp, attention in {s.extreme_keep_layers} layer(s), recovered",
                     **_summary(extreme[1], extreme[0], key)})
    for row in rows:
        row["retention"] = row[key] / reference[key] if key == "val_accuracy" else None
    run.report.tradeoff = points
    run.report.add_section("SHRP", _explain(cfg, s.baseline, key) + "\n\n" + markdown_table(rows)
                           + "\n\nThreshold sweep (no recovery):\n\n" + markdown_table(points))
    for row in rows:
        run.report.add_metric(f"shrp_summary.{row['model']}", {k: v for k, v in row.items() if k != "model"})
    run.bench({name: _encoder(m) for name, m in models.items()})
    run.save(model, tokenizer, "model", source=info.get("source"))
    return True


def _extreme(run: "RecipeRun", model: nn.Module, keep_layers: int) -> tuple[nn.Module, dict] | None:
    extreme = copy.deepcopy(model)
    layers = [(float(m.contribution), path, m) for path, m in shrp_layers(extreme).items() if not m.config.drop_attention]
    for _, path, layer in sorted(layers, key=lambda t: -t[0])[keep_layers:]:
        layer.drop_attention()
    steps = run.config.prune.recover_steps
    if steps and not run.train(extreme, "shrp-extreme-recover", steps):
        return None
    return extreme, run.evaluate(extreme, "shrp-extreme")


def _summary(metrics: dict[str, float], model: nn.Module, key: str) -> dict[str, Any]:
    return {key: metrics[key], "params": metrics["params"], "attention params": attention_params(model)}


def _explain(cfg: Any, has_baseline: bool, key: str) -> str:
    s = cfg.shrp
    base = "the fine-tuned MHA model (same recipe settings)" if has_baseline else "the unpruned SHRP model"
    return (f"SHRP-style (as implemented here; the paper's code is not public): top-1 head routing with a shared "
            f"expander, fine-tuned {cfg.train.max_steps} steps; heads kept when routed at least {s.threshold:g} "
            f"of {cfg.prune.calib_samples} calibration samples' tokens; {cfg.prune.recover_steps} recovery steps. "
            f"Retention = {key} / {key} of {base}.")
