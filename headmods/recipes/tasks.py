"""Lightning tasks that train any host model holding headmods layers.

- :class:`ClassificationTask`: a transformers ``*ForSequenceClassification`` model; accuracy
  (micro) and macro-F1 from torchmetrics.
- :class:`CausalLMTask`: a transformers ``*ForCausalLM`` model; perplexity from the summed
  negative log-likelihood and the token count, both accumulated with ``torchmetrics.SumMetric``
  (``torchmetrics.text.Perplexity`` would materialize a softmax over the vocabulary), and
  next-token accuracy (``val_token_accuracy``: the argmax equals the next token) over the same
  predicted positions (padding and ``-100`` labels left out).

Both add ``aux_weight * headmods.collect_aux_losses(model, "mean")`` to the training loss (routed
layers' load-balance terms, each already weighted by its layer config; ``aux_weight`` defaults to
1), use AdamW with linear warm-up and decay, and keep torch's RNG state in their
Lightning checkpoints so a resumed run draws the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..layers.base import collect_aux_losses

__all__ = ["RecipeTask", "ClassificationTask", "CausalLMTask"]


class RecipeTask(L.LightningModule):
    """Shared optimization for the recipe tasks (subclasses define the loss and the metrics)."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float = 0.01, warmup_steps: int = 0,
                 total_steps: int = 1, aux_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.aux_weight = lr, weight_decay, aux_weight
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)

    def task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.task_loss(batch)
        aux = collect_aux_losses(self.model, reduction="mean")
        if aux is not None and self.aux_weight:
            self.log("train_aux", aux.detach(), batch_size=batch["input_ids"].size(0))
            loss = loss + self.aux_weight * aux
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def param_groups(self, exclude: set[int] = frozenset()) -> list[dict[str, Any]]:
        """AdamW groups of the trainable parameters not in ``exclude`` (ids): no decay on biases and norms."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in exclude:
                (no_decay if p.dim() < 2 else decay).append(p)
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW([g for g in self.param_groups() if g["params"]], lr=self.lr)
        warmup, total = self.warmup_steps, self.total_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def compute_metrics(self) -> dict[str, Tensor]:
        """The validation metrics accumulated by ``validation_step`` calls (then reset)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, float]:
        """Run ``validation_step`` over ``loader`` outside a Trainer (eval mode), return the metrics.

        The wrapped model's modules get their own train/eval flags back afterwards (a task is
        created in training mode; restoring *its* flag would switch dropout on in the model).
        """
        modes = {m: m.training for m in self.model.modules()}
        self.eval()
        try:
            for i, batch in enumerate(loader):
                self.validation_step(batch, i)
            return {k: float(v) for k, v in self.compute_metrics().items()}
        finally:
            for module, mode in modes.items():
                module.training = mode

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["headmods_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "headmods_rng" in checkpoint:
            torch.set_rng_state(checkpoint["headmods_rng"])


class ClassificationTask(RecipeTask):
    """Sequence classification: cross-entropy, accuracy and macro-F1."""

    def __init__(self, model: nn.Module, *, num_labels: int, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        local = {"sync_on_compute": False}  # evaluated in one process (rank 0) after fit
        self.val_loss = MeanMetric(**local)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro", **local)
        self.val_f1 = MulticlassF1Score(num_classes=num_labels, average="macro", **local)

    def _logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self._logits(batch), batch["labels"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self._logits(batch)
        self.val_loss.update(F.cross_entropy(logits, batch["labels"]), weight=batch["labels"].numel())
        preds = logits.argmax(-1)
        self.val_accuracy.update(preds, batch["labels"])
        self.val_f1.update(preds, batch["labels"])

    def compute_metrics(self) -> dict[str, Tensor]:
        out = {"val_loss": self.val_loss.compute(), "val_accuracy": self.val_accuracy.compute(),
               "val_f1": self.val_f1.compute()}
        for metric in (self.val_loss, self.val_accuracy, self.val_f1):
            metric.reset()
        return out


class CausalLMTask(RecipeTask):
    """Causal language modelling: next-token cross-entropy, perplexity and next-token accuracy."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.val_nll = SumMetric(sync_on_compute=False)  # evaluated in one process (rank 0) after fit
        self.val_tokens = SumMetric(sync_on_compute=False)
        self.val_correct = SumMetric(sync_on_compute=False)

    def _next_token(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Logits at positions ``0 .. T-2`` ``(B, T-1, V)`` and the tokens they predict ``(B, T-1)``
        (``-100`` where nothing is predicted: padding, or labels already ``-100``)."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        labels = batch["labels"][:, 1:]  # token t+1 is predicted at t
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return logits[:, :-1], labels

    @staticmethod
    def _summed_nll(logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")

    def _nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed next-token NLL and the number of predicted tokens."""
        logits, labels = self._next_token(batch)
        return self._summed_nll(logits, labels), (labels != -100).sum()

    def task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        nll, tokens = self._nll(batch)
        return nll / tokens.clamp_min(1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, labels = self._next_token(batch)
        predicted = labels != -100
        self.val_nll.update(self._summed_nll(logits, labels))
        self.val_tokens.update(predicted.sum())
        self.val_correct.update(((logits.argmax(-1) == labels) & predicted).sum())

    def compute_metrics(self) -> dict[str, Tensor]:
        tokens = self.val_tokens.compute().clamp_min(1)
        mean = self.val_nll.compute() / tokens
        accuracy = self.val_correct.compute() / tokens
        for metric in (self.val_nll, self.val_tokens, self.val_correct):
            metric.reset()
        return {"val_loss": mean, "val_ppl": torch.exp(mean), "val_token_accuracy": accuracy}
