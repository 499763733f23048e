"""The ``dha`` recipe: MHA/GQA checkpoint -> DHA at a K/V budget, against GQA mean-pool at equal tokens.

Stages (``docs/methods/dha.md``; :mod:`headmods.convert.dha` for the method):

1. the source: a checkpoint, or with ``model.scratch`` an MHA LM trained here first
   (``dha.pretrain_steps``); its held-out loss is the reference;
2. DHA swap (exact), calibration statistics, the global grouping plan at ``dha.budget``;
3. fusion stage (``dha.fusion_steps``): LM loss plus the augmented-Lagrangian fusion loss, the
   fusion weights at ``dha.fusion_lr``; then the fused weights are written and groups collapsed;
4. continued training (``train.max_steps``);
5. baseline: GQA mean-pool at the same budget, continued-trained for ``fusion_steps + max_steps``
   so both have seen the same training tokens at the end; the held-out curves are against tokens.
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor

from ..convert.dha import collapse, dha_layers, input_moments, plan_dha, plan_gqa, to_dha
from ..convert.dha_fusion import (FusionLagrangian, attach_fusion, fusion_loss, fusion_parameters,
                                  materialize_fusion, set_consensus)
from .report import markdown_table
from .tasks import CausalLMTask

if TYPE_CHECKING:
    from .runner import RecipeRun

__all__ = ["FusionTask", "HeldOutCurve", "run_dha"]


class FusionTask(CausalLMTask):
    """Causal LM loss plus ``lagrangian.penalty(fusion loss)``; dual ascent after every step.

    The fusion weights get their own learning rate (``fusion_lr``, no weight decay); with
    ``train_model=False`` they are the only trainable parameters.
    """

    def __init__(self, model: Any, *, lagrangian: FusionLagrangian, fusion_lr: float, train_model: bool = True,
                 consensus_ramp: float = 0.25, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.lagrangian, self.fusion_lr, self.train_model = lagrangian, fusion_lr, train_model
        self.consensus_ramp = consensus_ramp
        self.history: list[tuple[int, float]] = []
        self._last = 0.0

    def param_groups(self, exclude: set[int] = frozenset()) -> list[dict[str, Any]]:
        omegas = fusion_parameters(self.model)
        if not omegas:
            raise ValueError("the fusion stage needs HeadFusion modules in the model (attach_fusion)")
        groups = super().param_groups({id(p) for p in omegas} | set(exclude)) if self.train_model else []
        return groups + [{"params": omegas, "weight_decay": 0.0, "lr": self.fusion_lr}]

    def consensus(self, step: int) -> float:
        """The blend toward group means at ``step``: 0, then rising linearly to 1 over the last
        ``consensus_ramp`` of the stage (reached on its final step)."""
        if self.consensus_ramp <= 0:
            return 0.0
        start = (1.0 - self.consensus_ramp) * self.total_steps
        return min(1.0, max(0.0, (step + 1 - start) / (self.total_steps - start)))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        set_consensus(self.model, self.consensus(self.global_step))
        loss = super().training_step(batch, batch_idx)
        fuse = fusion_loss(self.model)
        self._last = float(fuse.detach())
        self.log("fusion", fuse.detach(), prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss + self.lagrangian.penalty(fuse)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.lagrangian.ascend(self._last)
        with torch.no_grad():
            self.history.append((self.global_step, float(fusion_loss(self.model, "max"))))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["headmods_fusion"] = self.lagrangian.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "headmods_fusion" in checkpoint:
            self.lagrangian.load_state_dict(checkpoint["headmods_fusion"])


class HeldOutCurve(L.Callback):
    """Held-out loss on fixed batches at the start and every ``every`` steps, against training tokens."""

    def __init__(self, batches: list[dict[str, Tensor]], every: int, tokens_per_step: int, offset_steps: int,
                 record: Any) -> None:
        self.batches, self.every, self.tokens_per_step = batches, every, tokens_per_step
        self.offset, self.record = offset_steps, record

    def _point(self, module: Any, step: int) -> None:
        self.record((self.offset + step) * self.tokens_per_step, module.evaluate(self.batches)["val_loss"])

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_step == 0:
            self._point(module, 0)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            self._point(module, step)


def run_dha(run: "RecipeRun") -> bool:
    cfg, s = run.config, run.config.dha
    if cfg.model.task != "causal-lm":
        raise ValueError(f"the dha recipe trains language models (model.task: causal-lm), got {cfg.model.task!r}")
    model, tokenizer, info = _source(run)
    if model is None:
        return False
    source = run.evaluate(model, "source")
    layers = to_dha(model)
    calib = run.dm.calibration_batches(min(s.calib_samples, len(run.dm.train_dataset)))
    plan = plan_dha(layers, s.budget, moments=input_moments(model, layers, calib), linkage=s.linkage)
    gqa = copy.deepcopy(model) if s.baseline else None
    curve_batches = list(itertools.islice(iter(run.dm.val_dataloader()), s.eval_batches))
    per_step = cfg.data.batch_size * cfg.train.accumulate_grad_batches * cfg.data.max_length * _world(cfg)

    def curve(name: str, offset: int) -> HeldOutCurve:
        return HeldOutCurve(curve_batches, s.eval_every, per_step, offset,
                            lambda tokens, loss: run.report.held_out.setdefault(name, []).append((tokens, loss)))

    attach_fusion(layers, plan.groups)
    lagrangian = FusionLagrangian(mu=s.fusion_mu, dual_lr=s.fusion_dual_lr)
    t = cfg.train
    task = FusionTask(model, lagrangian=lagrangian, fusion_lr=s.fusion_lr, train_model=s.fusion_train_model,
                      consensus_ramp=s.fusion_consensus_ramp, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * s.fusion_steps),
                      total_steps=s.fusion_steps, aux_weight=t.aux_weight)
    start_fusion = float(fusion_loss(model, "max").detach())
    if not run.train(model, "dha-fusion", s.fusion_steps, task=task, callbacks=(curve("dha (fusion, then continued)", 0),)):
        return False
    set_consensus(model, 0.0)
    end_fusion = float(fusion_loss(model, "max").detach())  # the heads' own disagreement, before the ramp
    set_consensus(model, task.consensus(s.fusion_steps - 1))
    materialize_fusion(model)
    collapse(layers, plan)
    results = {"dha": {"start": run.evaluate(model, "dha-start")}}
    if not run.train(model, "dha-continue", t.max_steps, callbacks=(curve("dha (fusion, then continued)", s.fusion_steps),)):
        return False
    results["dha"]["end"] = run.evaluate(model, "dha-end")
    if gqa is not None:
        glayers = dha_layers(gqa)
        collapse(glayers, plan_gqa(glayers, s.budget))
        results["gqa"] = {"start": run.evaluate(gqa, "gqa-start")}
        if not run.train(gqa, "gqa-continue", s.fusion_steps + t.max_steps, callbacks=(curve("gqa mean-pool", 0),)):
            return False
        results["gqa"]["end"] = run.evaluate(gqa, "gqa-end")
    _report(run, plan, layers, gqa, source, results, (start_fusion, end_fusion, task.history, lagrangian.lam), per_step)
    run.save(model, tokenizer, "model", source=info.get("source"))
    return True


def _world(cfg: Any) -> int:
    return cfg.train.devices if isinstance(cfg.train.devices, int) else 1


def _source(run: "RecipeRun") -> tuple[Any, Any, dict[str, Any]]:
    cfg = run.config
    if cfg.model.scratch is None:
        run._load_data()
        return run._model()
    from .scratch import parse_tokenizer_spec, scratch_model

    run.dm = run.data(parse_tokenizer_spec(cfg.model.tokenizer))
    model = scratch_model(cfg.model.scratch, run.dm.tokenizer)
    if not run.train(model, "pretrain-mha", cfg.dha.pretrain_steps):
        return None, None, {}
    return model, run.dm.tokenizer, {}


def _report(run: "RecipeRun", plan: Any, layers: dict, gqa: Any, source: dict, results: dict,
            fusion: tuple, per_step: int) -> None:
    s, t = run.config.dha, run.config.train
    first = next(iter(layers.values()))
    h = first.num_heads
    source_kv = {path: sum(len(g) for g in groups["k"]) for path, groups in plan.groups.items()}
    kept = sum(m.num_kv_heads + m.config.num_v_heads for m in layers.values())
    total_src = 2 * sum(source_kv.values())
    rows = [{"model": "source", "K+V heads": total_src, "KV cache vs source": 1.0,
             "KV cache vs MHA": total_src / (2 * h * len(layers)), "held-out loss": source["val_loss"],
             "params": source["params"]}]
    for name, label, steps in (("dha", "dha", (s.fusion_steps, s.fusion_steps + t.max_steps)),
                               ("gqa", "gqa mean-pool", (0, s.fusion_steps + t.max_steps))):
        if name not in results:
            continue
        model_layers = layers if name == "dha" else dha_layers(gqa)
        heads = sum(m.num_kv_heads + m.config.num_v_heads for m in model_layers.values())
        for when, tokens in zip(("start", "end"), steps):
            rows.append({"model": f"{label}, {when} of continued training", "K+V heads": heads,
                         "KV cache vs source": heads / total_src, "KV cache vs MHA": heads / (2 * h * len(layers)),
                         "training tokens": tokens * per_step, "held-out loss": results[name][when]["val_loss"],
                         "params": results[name][when]["params"]})
    allocation = [{"layer": path, "k heads": m.num_kv_heads, "v heads": m.config.num_v_heads,
                   "k_map": " ".join(map(str, m.config.k_map)), "v_map": " ".join(map(str, m.config.query_to_value()))}
                  for path, m in layers.items()]
    start_fusion, end_fusion, history, lam = fusion
    for step, value in history:
        run.report.add_curve_point("dha fusion loss (max over projections)", step, value)
    run.report.add_metric("dha.kv_heads_kept", kept)
    run.report.add_metric("dha.kv_fraction_of_source", kept / total_src)
    run.report.add_metric("dha.fusion_loss_max", {"start": start_fusion, "end": end_fusion})
    run.report.add_metric("dha.lagrange_multiplier", lam)
    for name, r in results.items():
        for when, metrics in r.items():
            run.report.add_metric(f"dha_summary.{name}.{when}_val_loss", metrics["val_loss"])
    for name, points in run.report.held_out.items():
        run.report.add_metric(f"dha_curves.{name}", [[int(tokens), float(loss)] for tokens, loss in points])
    text = (f"DHA as implemented here (the paper's code is not public): key and value heads grouped per layer by "
            f"{plan.kind} under a global budget of {s.budget:g} of the source's K/V heads, {s.fusion_steps} fusion "
            f"steps (largest relative fusion loss {start_fusion:.3g} -> {end_fusion:.3g} without the consensus "
            f"blend, multiplier {lam:.3g}; the blend toward group means over the last {s.fusion_consensus_ramp:.0%} "
            f"of the steps makes the heads equal at the end), collapse to group means, then {t.max_steps} steps of continued training. GQA mean-pool keeps the "
            f"same number of K/V heads (contiguous groups shared by K and V) and trains "
            f"{s.fusion_steps + t.max_steps} steps, so both have seen the same tokens at the end. Training tokens = "
            f"steps x batch x max_length ({per_step} per step; padding included). Curve points use the first "
            f"{s.eval_batches} validation batches; the table uses the whole validation split.")
    run.report.add_section("DHA", text + "\n\n" + markdown_table(rows) + "\n\nHeld-out loss at equal training "
                           "tokens (curve points; DHA's first points are the fusion stage, before the collapse):\n\n"
                           + markdown_table(_equal_tokens(run.report.held_out)) + "\n\nPer-layer allocation:\n\n"
                           + markdown_table(allocation))


def _equal_tokens(curves: dict[str, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """One row per token count; a curve's last point wins where the fusion and collapse share one."""
    table: dict[int, dict[str, Any]] = {}
    for name, points in curves.items():
        for tokens, loss in points:
            table.setdefault(tokens, {"training tokens": tokens})[name] = loss
    return [table[k] for k in sorted(table)]
