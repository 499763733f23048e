"""The recipe runner: convert, finetune, prune, eval and demo as sequences of stages.

Every run writes into ``output_dir``: the final model as a headmods folder (``model/``; the demo
also keeps ``finetuned/``), ``report.md`` + ``metrics.json`` + PNG plots, and resumable Lightning
checkpoints under ``lightning/<stage>/``, and ``run.json``, the run record.

Before writing anything a run claims ``output_dir`` (:mod:`headmods.recipes.run_folder`): a
missing or empty folder starts a fresh run; running the same command again (same recipe, same
settings) resumes a fit stage from its last checkpoint. A folder headmods did not create, a
folder holding another recipe's run (an ``eval`` never replaces a fine-tune's results) and a
folder holding this recipe's run with other settings are refused; ``overwrite=True``
(``--overwrite``) removes a same-recipe run and starts over, ``resume=True`` (``--resume``)
refuses to start anything but a resume. Only rank 0 continues after a distributed fit.

Example:
    >>> from headmods.recipes.config import load_config
    >>> config = load_config("recipes/minilm_bbc_eval.yaml", ["output_dir=/tmp/eval"])  # doctest: +SKIP
    >>> run_recipe(config, resume=True).metrics["eval"]["val_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ..bench import compare
from ..errors import ConfigError
from ..io import save
from ..prune import head_importance, plan_from_scores, prune_heads
from .build import build_model, source_model
from .config import RecipeConfig
from .data import RecipeDataModule
from .report import RunReport, markdown_table
from .run_folder import RunFolder, claim_run_folder
from .training import fit, make_task

__all__ = ["run_recipe", "RecipeRun", "summary_rows"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class RecipeRun:
    """One recipe run; ``run()`` claims ``output_dir``, executes the stages of ``config.recipe``
    and writes the report (``resume`` / ``overwrite``: see the module docstring)."""

    def __init__(self, config: RecipeConfig, *, command: str | None = None, callbacks: tuple = (),
                 log: Any = None, resume: bool = False, overwrite: bool = False) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.callbacks = callbacks
        self.log = log or (lambda msg: print(msg, flush=True))
        self.command = command or shlex.join(["headmods", *sys.argv[1:]])
        self.report = RunReport(title=f"headmods {config.recipe}: {config.model.checkpoint or config.model.source}",
                                command=self.command, config=config.to_dict())
        self.resume, self.overwrite = resume, overwrite
        self.folder: RunFolder | None = None
        self.dm: RecipeDataModule | None = None
        self.rank = 0

    # -- stages ------------------------------------------------------------------------------------
    def data(self, tokenizer: Any) -> RecipeDataModule:
        dm = RecipeDataModule(self.config.data, tokenizer, task=self.config.model.task, cache_dir=self.out / "cache")
        dm.setup("fit")
        described = dm.describe()
        rows = [{"field": k, "value": v if isinstance(v, (int, float, str)) or v is None else json.dumps(v)}
                for k, v in described.items()]
        self.report.add_section("Data", "Splits are seeded; the same seed gives the same split.\n\n"
                                + markdown_table(rows))
        for key in ("train_size", "val_size", "seed"):
            if key in described:
                self.report.add_metric(f"data.{key}", described[key])
        return dm

    def labels(self) -> list[str] | None:
        return self.dm.label_names if self.dm is not None else None

    def evaluate(self, model: nn.Module, name: str) -> dict[str, float]:
        task = make_task(model, self.config.model.task, self.config.train, steps=1, num_labels=self.dm.num_labels)
        metrics = task.evaluate(self.dm.val_dataloader())
        metrics["params"] = _params(model)
        for key, value in metrics.items():
            self.report.add_metric(f"{name}.{key}", value)
        self.log(f"[{name}] " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def train(self, model: nn.Module, stage: str, steps: int, *, task: Any = None, callbacks: tuple = ()) -> bool:
        """Fit ``steps`` steps; False on non-zero ranks of a distributed run (they stop here).

        ``task`` replaces the recipe's default Lightning task (e.g. DHA's fusion stage);
        ``callbacks`` are added for this stage only.
        """
        if steps <= 0:
            return True
        if task is None:
            task = make_task(model, self.config.model.task, self.config.train, steps=steps,
                             num_labels=self.dm.num_labels)
        self.log(f"[{stage}] fine-tuning {steps} steps")
        start = time.perf_counter()
        trainer, history = fit(task, self.dm, self.config.train, steps=steps, stage_dir=self.out / "lightning" / stage,
                               callbacks=(*self.callbacks, *callbacks))
        self.rank = trainer.global_rank
        for step, loss in history:
            self.report.add_curve_point(f"{stage} train loss", int(step), float(loss))
        self.report.add_metric(f"{stage}.train_seconds", round(time.perf_counter() - start, 1))
        self.report.add_metric(f"{stage}.steps", steps)
        model.eval()
        return trainer.is_global_zero

    def bench(self, models: dict[str, nn.Module]) -> None:
        b = self.config.bench
        if not b.rounds:
            return
        vocab = getattr(next(iter(models.values())).config, "vocab_size", 1000)
        ids = torch.randint(min(1000, vocab - 1), vocab, (b.batch_size, b.seq_len), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        runs = {name: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for name, m in models.items()}
        self.log(f"[bench] forward, batch {b.batch_size}, seq {b.seq_len}, {b.rounds} rounds")
        with torch.no_grad():
            res = compare(runs, rounds=b.rounds, warmup=1, memory=False)
        rows = [{"label": name, "ms": res.median_ms(name), "ratio": res.ratio(name)} for name in models]
        self.report.latency = [{"label": r["label"], "ms": r["ms"]} for r in rows]
        self.report.add_section("Speed", f"Forward of the base model, batch {b.batch_size}, sequence {b.seq_len}, "
                                f"median of {b.rounds} alternating rounds in one process, {res.threads} threads.\n\n"
                                + markdown_table(rows))
        for r in rows:
            self.report.add_metric(f"bench.{r['label']}.ms", r["ms"])
            self.report.add_metric(f"bench.{r['label']}.ratio", r["ratio"])

    def prune_stage(self, model: nn.Module) -> dict[str, Any]:
        p = self.config.prune
        task = make_task(model, self.config.model.task, self.config.train, steps=1, num_labels=self.dm.num_labels)
        n = min(p.calib_samples, len(self.dm.train_dataset))
        batches = self.dm.calibration_batches(n)
        self.log(f"[prune] {p.importance} importance on {n} calibration samples")
        scores = head_importance(model, p.importance, batches=batches, loss_fn=lambda m, b: task.task_loss(b))
        plan = plan_from_scores(scores, ratio=p.ratio, uniform=p.uniform, ignore=p.ignore, min_heads=p.min_heads,
                                model=model)
        report = prune_heads(model, plan)
        self.report.head_scores = {k: v.tolist() for k, v in scores.items()}
        self.report.kept_heads = {k: list(v) for k, v in plan.keep.items()}
        self.report.add_section("Pruning", report.to_markdown())
        self.report.add_metric("prune.params_before", report.params_before)
        self.report.add_metric("prune.params_after", report.params_after)
        self.report.add_metric("prune.attention_params_before", report.attn_params_before)
        self.report.add_metric("prune.attention_params_after", report.attn_params_after)
        return plan.to_dict()

    def save(self, model: nn.Module, tokenizer: Any, name: str, source: Any = None) -> Path:
        self.usage(model)
        folder = save(model, self.out / name, tokenizer=tokenizer, source=source, overwrite=True,
                      provenance={"recipe": self.config.recipe, "seed": self.config.train.seed},
                      card={"metrics": {k: v for k, v in _flat(self.report.metrics).items() if "val_" in k}})
        self.log(f"[save] {folder}")
        return folder

    # -- recipes -----------------------------------------------------------------------------------
    def usage(self, model: nn.Module) -> None:
        """Routed layers' usage statistics (``usage`` EMA buffers) into the report's heatmap."""
        from ..layers.base import HeadAttention

        usage = {path: m.usage.tolist() for path, m in model.named_modules()
                 if isinstance(m, HeadAttention) and isinstance(getattr(m, "usage", None), torch.Tensor)}
        if usage:
            self.report.head_usage = usage

    def run(self) -> RunReport:
        """Claim ``output_dir`` (refusals raise :class:`~headmods.errors.RunFolderError`), run the
        stages, write the report and mark the run finished."""
        if not _worker_process():  # processes a distributed fit launched share rank 0's claim
            self.folder = claim_run_folder(self.out, recipe=self.config.recipe, config=self.config.to_dict(),
                                           command=self.command, resume=self.resume, overwrite=self.overwrite,
                                           log=self.log)
        try:
            L.seed_everything(self.config.train.seed, workers=True, verbose=False)
            recipe = getattr(self, f"_{self.config.recipe}")
            finished = recipe()
            if finished is False:
                return self.report  # a non-zero rank of a distributed fit
            files = self.report.write(self.out)
        except BaseException:
            if self.folder is not None:
                self.folder.release()
            raise
        if self.folder is not None:
            self.folder.finish()
        self.log(f"[report] {files['report.md']}")
        return self.report

    def _model(self) -> tuple[nn.Module, Any, dict[str, Any]]:
        model, tokenizer, info = build_model(self.config.model, label_names=self.labels())
        _check_variant(self.config.model.variant, self.config.model.checkpoint, model)
        for key, value in info.items():
            self.report.add_metric(f"model.{key}", value)
        return model, tokenizer, info

    def _load_data(self) -> None:
        """The data module, tokenized with the source's tokenizer (before the model: labels size its head)."""
        from ..convert import load_tokenizer, resolve_source

        cfg = self.config.model
        tokenizer = load_tokenizer(cfg.checkpoint if cfg.checkpoint else resolve_source(cfg.source))
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.dm = self.data(tokenizer)

    def _tokenizer_then_data(self) -> tuple[nn.Module, Any, dict[str, Any]]:
        self._load_data()
        return self._model()

    def _convert(self) -> bool:
        cfg = self.config
        if cfg.data is not None:
            model, tokenizer, info = self._tokenizer_then_data()
        else:
            model, tokenizer, info = self._model()
        if cfg.verify and cfg.model.checkpoint is None:
            reference, _, _ = source_model(cfg.model, label_names=self.labels())
            enc = tokenizer(["headmods converts attention layers and checks that nothing changed."] * 2,
                            return_tensors="pt")
            with torch.no_grad():
                a = _base(reference)(**enc).last_hidden_state
                b = _base(model)(**enc).last_hidden_state
            diff = float((a - b).abs().max())
            self.report.add_metric("convert.max_abs_diff", diff)
            self.log(f"[verify] max |source - converted| over the base model's hidden states = {diff:.3g}")
            if cfg.data is not None and cfg.model.task == "causal-lm":
                self.evaluate(reference, "source")
            del reference
        if cfg.data is not None and cfg.model.task == "causal-lm":
            self.evaluate(model, "converted")
        if cfg.data is not None and cfg.train.max_steps > 0:
            if not self.train(model, "calibrate", cfg.train.max_steps):
                return False
            self.evaluate(model, "calibrate")
        self.save(model, tokenizer, "model", source=info.get("source"))
        return True

    def _finetune(self) -> bool:
        model, tokenizer, info = self._tokenizer_then_data()
        if self.config.model.task == "causal-lm":
            self.evaluate(model, "before")
        if not self.train(model, "finetune", self.config.train.max_steps):
            return False
        self.evaluate(model, "finetune")
        self.save(model, tokenizer, "model", source=info.get("source"))
        return True

    def _eval(self) -> bool:
        model, _, _ = self._tokenizer_then_data()
        self.evaluate(model, "eval")
        self.bench({"model": _base(model)})
        return True

    def _prune(self, model: nn.Module | None = None, tokenizer: Any = None) -> bool:
        if model is None:
            model, tokenizer, _ = self._tokenizer_then_data()
        before = self.evaluate(model, "unpruned")
        unpruned = copy.deepcopy(model)
        self.prune_stage(model)
        pruned = self.evaluate(model, "pruned")
        points = [{"label": "unpruned", "params": before["params"], **_score(before)},
                  {"label": "pruned", "params": pruned["params"], **_score(pruned)}]
        steps = self.config.prune.recover_steps
        if steps:
            if not self.train(model, "recover", steps):
                return False
            recovered = self.evaluate(model, "recovered")
            points.append({"label": "pruned + recovered", "params": recovered["params"], **_score(recovered)})
        self.report.tradeoff = points
        self.bench({"unpruned": _base(unpruned), "pruned": _base(model)})
        self.save(model, tokenizer, "model")
        return True

    def _compare(self) -> bool:
        """Each variant from the same random init per seed, trained for the same steps (models not saved)."""
        from .compare_pipeline import run_compare

        return run_compare(self)

    def _passkey(self) -> bool:
        from .longheads_pipeline import run_passkey

        return run_passkey(self)

    def _dha(self) -> bool:
        from .dha_pipeline import run_dha

        return run_dha(self)

    def _shrp(self) -> bool:
        from .shrp_pipeline import run_shrp

        self._load_data()
        return run_shrp(self)

    def _demo(self) -> bool:
        model, tokenizer, info = self._tokenizer_then_data()
        if not self.train(model, "finetune", self.config.train.max_steps):
            return False
        self.evaluate(model, "finetune")
        self.save(model, tokenizer, "finetuned", source=info.get("source"))
        return self._prune(model, tokenizer)


def _worker_process() -> bool:
    """True in a process that a distributed launcher started for a non-zero rank."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(name, "0")
        if value.strip() not in ("", "0"):
            return True
    return False


def _check_variant(variant: str | None, checkpoint: str | None, model: nn.Module) -> None:
    """``model.variant`` must name the attention of a ``model.checkpoint`` folder (or be null)."""
    from ..layers.base import HeadAttention

    if checkpoint is None or variant is None:
        return
    held = sorted({type(m).variant for m in model.modules() if isinstance(m, HeadAttention)})
    if held and held != [variant]:
        raise ConfigError(f"model.variant is {variant!r} but the folder {checkpoint} (model.checkpoint) holds "
                          f"{', '.join(repr(v) for v in held)} attention; set model.variant={held[0]} or "
                          "model.variant=null")


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _score(metrics: dict[str, float]) -> dict[str, float]:
    return {"accuracy": metrics["val_accuracy"]} if "val_accuracy" in metrics else {"perplexity": metrics["val_ppl"]}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def summary_rows(report: RunReport) -> list[dict[str, Any]]:
    """One row per evaluated stage (validation metrics and parameters), then the speed rows."""
    shown = ("val_loss", "val_accuracy", "val_f1", "val_ppl", "val_token_accuracy", "params")
    rows = []
    for stage, values in report.metrics.items():
        if isinstance(values, dict) and any(k in values for k in shown[:-1]):
            rows.append({"stage": stage, **{k: values[k] for k in shown if k in values}})
    for row in report.latency:
        rows.append({"stage": f"speed: {row['label']}", "ms": row["ms"]})
    return rows


def run_recipe(config: RecipeConfig, *, command: str | None = None, callbacks: tuple = (), resume: bool = False,
               overwrite: bool = False) -> RunReport:
    """Run ``config`` (see :class:`RecipeRun`) and return its report.

    ``resume=True`` refuses unless ``output_dir`` holds this recipe's run with the same settings;
    ``overwrite=True`` removes such a run with any settings and starts over (never another
    recipe's run). Without either, a run with the same settings is resumed.

    Example:
        >>> from headmods.recipes.config import load_config
        >>> config = load_config("recipes/minilm_bbc_finetune.yaml", ["train.lr=2e-4"])  # doctest: +SKIP
        >>> run_recipe(config, overwrite=True)  # doctest: +SKIP
    """
    return RecipeRun(config, command=command, callbacks=callbacks, resume=resume, overwrite=overwrite).run()
