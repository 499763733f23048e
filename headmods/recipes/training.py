"""Fitting a recipe task with Lightning: trainer settings, resumable checkpoints, loss history.

Each fit stage keeps ``<output_dir>/lightning/<stage>/last.ckpt`` (every
``checkpoint_every_n_steps``). Running the same command again resumes from it: Lightning restores
the model, optimizer, scheduler and loop counters, the task restores torch's RNG state, and the
data module's step-indexed training stream continues with the batch of the restored step, so the
resumed run computes what the uninterrupted one would have. Lightning checkpoints are resume
artifacts read with ``weights_only=True``; one that cannot be read so (truncated, or holding
pickled objects) is a :class:`~headmods.errors.CheckpointError` naming the file. The
distribution format is the headmods folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..errors import CheckpointError
from .config import TrainConfig
from .tasks import RecipeTask

__all__ = ["LossHistory", "ProgressSchedule", "check_resume_checkpoint", "fit", "make_task"]


class LossHistory(Callback):
    """Training loss every ``every`` optimizer steps, kept across a resume (callback state)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.points: list[list[float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        step = trainer.global_step
        if loss is not None and step % self.every == 0 and (not self.points or self.points[-1][0] != step):
            self.points.append([step, float(loss)])

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = [list(p) for p in state.get("points", [])]


class ProgressSchedule(Callback):
    """Tells layers with ``set_progress(fraction)`` (SHRP's temperature and load-balance annealing)
    how far training is, before every step."""

    def __init__(self, total_steps: int) -> None:
        self.total = max(1, total_steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        fraction = trainer.global_step / self.total
        for module in pl_module.modules():
            if hasattr(module, "set_progress") and callable(module.set_progress):
                module.set_progress(fraction)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's start-up chatter (hardware lines, tips) and known-harmless warnings off
    the console for the length of a fit; real warnings and errors still show."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        warnings.filterwarnings("ignore", message=r".*litlogger")
        try:
            yield
        finally:
            logger.setLevel(level)


def make_task(model: Any, task: str, train: TrainConfig, *, steps: int, num_labels: int | None = None) -> RecipeTask:
    from .tasks import CausalLMTask, ClassificationTask

    kwargs = dict(lr=train.lr, weight_decay=train.weight_decay, warmup_steps=math.floor(train.warmup_ratio * steps),
                  total_steps=steps, aux_weight=train.aux_weight)
    if task == "classification":
        return ClassificationTask(model, num_labels=num_labels, **kwargs)
    return CausalLMTask(model, **kwargs)


def check_resume_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` loads with ``torch.load(weights_only=True)``.

    The file is memory-mapped, so tensors are not read: the check costs little for large models.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     bad = pathlib.Path(d) / "last.ckpt"
        ...     _ = bad.write_bytes(b"cut short")
        ...     try:
        ...         check_resume_checkpoint(bad)
        ...     except CheckpointError as e:
        ...         "truncated or corrupt" in str(e)
        True
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(f"the resume checkpoint {path} holds pickled objects"
                              f"{f' ({found.group(1)})' if found else ''} that loading with weights_only=True "
                              "refuses; pass --overwrite to start the run over") from e
    except Exception as e:  # any other failure: the file cannot be resumed from
        first = " ".join(str(e).split()).split(". ")[0] or type(e).__name__
        raise CheckpointError(f"the resume checkpoint {path} is truncated or corrupt ({first}); pass --overwrite to "
                              "start the run over") from e


def fit(task: RecipeTask, datamodule: L.LightningDataModule, train: TrainConfig, *, steps: int, stage_dir: Path,
        callbacks: tuple[Callback, ...] = ()) -> tuple[L.Trainer, list[list[float]]]:
    """Train ``task`` for ``steps`` optimizer steps; resume from ``stage_dir/last.ckpt`` when present.

    Raises:
        CheckpointError: ``last.ckpt`` exists but cannot be read with ``weights_only=True``.
    """
    history = LossHistory(train.log_every_n_steps)
    world = train.devices if isinstance(train.devices, int) else 1
    per_epoch = max(1, len(datamodule.train_dataset) // (datamodule.config.batch_size * world))
    epochs = math.ceil(steps * train.accumulate_grad_batches / per_epoch)  # max_steps ends the run first
    ckpt = ModelCheckpoint(dirpath=stage_dir, every_n_train_steps=train.checkpoint_every_n_steps, save_last=True,
                           save_top_k=0, enable_version_counter=False)
    with quiet_lightning():
        trainer = L.Trainer(
            max_steps=steps, max_epochs=epochs, accelerator=train.accelerator, devices=train.devices,
            strategy=train.strategy, precision=train.precision, accumulate_grad_batches=train.accumulate_grad_batches,
            callbacks=[history, ckpt, ProgressSchedule(steps), *callbacks], logger=False, enable_model_summary=False,
            enable_progress_bar=train.progress_bar, limit_val_batches=0, num_sanity_val_steps=0,
            log_every_n_steps=train.log_every_n_steps, default_root_dir=str(stage_dir),
        )
    last = stage_dir / "last.ckpt"
    if last.is_file():
        check_resume_checkpoint(last)
    task.train()  # models arrive in eval mode (loaders, evaluation); Lightning keeps submodule modes
    with quiet_lightning():
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
    return trainer, history.points
