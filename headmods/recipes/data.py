"""Fine-tuning data for the recipes: a validated config and a step-resumable DataModule.

:class:`DataConfig` says where the texts come from (BBC News, pydoc, passkey prompts, label
folders, text / JSON Lines / parquet files), how to split and tokenize them and the batch sizes.
:class:`RecipeDataModule` turns it into tokenized train/val splits for a sequence classifier or
a causal LM. Its training loader is a :class:`StepStream`: batch ``i`` is a pure function of
``(seed, i)``, so a fine-tune killed and resumed at optimizer step ``s`` continues with exactly
the batches the uninterrupted run would have seen.

Example:
    >>> cfg = DataConfig.from_dict({"kind": "pydoc", "max_length": 64})
    >>> cfg.kind, cfg.batch_size
    ('pydoc', 16)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, IterableDataset

from .scratch import BPEFactory
from .text_sources import SAMPLE_BY, bbc_folder, load_local, passkey_samples, pydoc_texts

__all__ = ["DATA_KINDS", "TASKS", "Collator", "DataConfig", "RecipeDataModule", "ResumableLoader", "StepStream"]

DATA_KINDS = ("bbc", "pydoc", "passkey", "folder", "text", "json", "parquet")
TASKS = ("classification", "causal-lm")
_NEEDS_PATH = ("folder", "text", "json", "parquet")
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DataConfig:
    """Where the texts come from and how they are split, tokenized and batched (JSON-able).

    ``kind``: ``bbc`` (``path`` optional: the installed corpus), ``pydoc``, ``passkey`` (no
    path), ``folder`` / ``text`` / ``json`` / ``parquet`` (``path`` required). ``limit`` keeps
    at most that many examples, chosen by a shuffle seeded with ``seed``.

    Example:
        >>> DataConfig("text", "corpus/*.txt", val_fraction=0.1).to_dict()["val_fraction"]
        0.1
    """

    kind: str
    path: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = 128
    val_fraction: float = 0.2
    seed: int = 0
    limit: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 32
    sample_by: str = "document"
    passkey_samples: int = 64
    passkey_filler: int = 200
    passkey_loss: str = "all"  # causal-lm on passkey prompts: "all" real tokens or only the "answer"

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; expected one of {DATA_KINDS}")
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.path is not None and not isinstance(self.path, str):
            raise ValueError(f"DataConfig.path must be a str or None, got {type(self.path).__name__}")
        if self.kind in _NEEDS_PATH and not self.path:
            raise ValueError(f"data kind {self.kind!r} needs a path (a file, folder or glob), got {self.path!r}")
        if self.kind in ("pydoc", "passkey") and self.path is not None:
            raise ValueError(f"data kind {self.kind!r} is built in and takes no path, got {self.path!r}")
        for name in ("text_field", "label_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"DataConfig.{name} must be a non-empty str, got {getattr(self, name)!r}")
        lows = {"max_length": 2, "seed": 0, "batch_size": 1, "eval_batch_size": 1, "passkey_samples": 1,
                "passkey_filler": 1, "limit": 1}  # fmt: skip
        for name, low in lows.items():
            value = getattr(self, name)
            bad = isinstance(value, bool) or not isinstance(value, int) or value < low
            if bad and not (name == "limit" and value is None):
                raise ValueError(f"DataConfig.{name} must be an int >= {low}, got {value!r}")
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"DataConfig.val_fraction must lie strictly between 0 and 1, got {fraction!r}")
        if self.passkey_loss not in ("all", "answer"):
            raise ValueError(f"DataConfig.passkey_loss must be 'all' or 'answer', got {self.passkey_loss!r}")
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"DataConfig.sample_by must be one of {SAMPLE_BY}, got {self.sample_by!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain JSON-able dict (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """Build from a mapping; unknown keys are an error that names them and the known ones.

        Example:
            >>> DataConfig.from_dict({"kind": "bbc", "limit": 100}).limit
            100
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"DataConfig.from_dict expects a mapping, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown DataConfig key(s) {unknown}; the known keys are {known}")
        if "kind" not in values:
            raise ValueError(f"DataConfig needs the key 'kind' (one of {DATA_KINDS}); got keys {sorted(values)}")
        return cls(**dict(values))


class Collator:
    """Stack tokenized rows into a batch of tensors, padding to the longest row with ``pad_id``.

    Rows hold ``input_ids`` and ``labels`` (plus ``attention_mask`` for classification); padded
    positions get ``attention_mask`` 0. LM rows all have the same length, so nothing is padded.

    Example:
        >>> Collator(0)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
        ...              {"input_ids": [5], "attention_mask": [1], "labels": 0}])["attention_mask"]
        tensor([[1, 1, 1],
                [1, 0, 0]])
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if "attention_mask" not in rows[0]:  # causal-LM blocks: equal lengths by construction
            return {key: torch.tensor([row[key] for row in rows], dtype=torch.long) for key in ("input_ids", "labels")}
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"], dtype=torch.long)
            mask[i, : len(row["attention_mask"])] = torch.tensor(row["attention_mask"], dtype=torch.long)
        labels = torch.tensor([row["labels"] for row in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class StepStream(IterableDataset):
    """Collated training batches as a pure function of ``(seed, batch counter)``.

    Overall batch ``i`` belongs to epoch ``e = i // batches_per_epoch`` at position
    ``j = i % batches_per_epoch``. Epoch ``e`` orders the ``n`` samples by
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``; rank ``r`` of
    ``world_size`` ranks takes positions ``[j*B*W + r*B, j*B*W + (r+1)*B)`` of that order
    (``B = batch_size``, ``W = world_size``), so ranks never share a sample, and the incomplete
    last global batch is dropped: ``batches_per_epoch = n // (B*W)`` (also ``len(stream)``).

    ``iter(stream)`` asks ``start_fn()`` (when iteration begins; None means 0) for the counter
    to start at and yields the *remaining batches of that epoch only*, so a loader's epochs line
    up with Lightning's. Nothing is stored between runs: resuming at counter ``k`` replays
    batch ``k``, ``k+1``, ... of the uninterrupted sequence.

    Example:
        >>> rows = [{"input_ids": [i, i], "labels": [i, i]} for i in range(10)]
        >>> stream = StepStream(rows, batch_size=4, seed=0, collate_fn=Collator(0))
        >>> len(stream), [b["input_ids"].shape for b in stream]
        (2, [torch.Size([4, 2]), torch.Size([4, 2])])
    """

    def __init__(
        self, dataset: Sequence[Mapping[str, Any]], *, batch_size: int, seed: int,
        collate_fn: Callable[[list[Any]], Any], start_fn: Callable[[], int] | None = None,
        world_size: int = 1, rank: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StepStream needs batch_size >= 1 and 0 <= rank < world_size, got batch_size="
                             f"{batch_size}, rank={rank}, world_size={world_size}")  # fmt: skip
        self.dataset, self.batch_size, self.seed, self.collate_fn = dataset, batch_size, seed, collate_fn
        self.start_fn, self.world_size, self.rank = start_fn, world_size, rank
        if self.batches_per_epoch == 0:
            raise ValueError(f"too few training samples: {len(dataset)} samples give no full global batch of "
                             f"batch_size {batch_size} x world_size {world_size} = {batch_size * world_size}")

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch: ``len(dataset) // (batch_size * world_size)``."""
        return len(self.dataset) // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        counter = 0 if self.start_fn is None else int(self.start_fn())
        if counter < 0:
            raise ValueError(f"StepStream start counter must be >= 0, got {counter}")
        epoch, first = divmod(counter, self.batches_per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        size, step = self.batch_size, self.batch_size * self.world_size
        for j in range(first, self.batches_per_epoch):
            start = j * step + self.rank * size
            yield self.collate_fn([self.dataset[k] for k in order[start : start + size]])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`StepStream` that Lightning treats as resumable.

    Its ``state_dict`` is empty because the stream needs none: the position comes from the
    trainer's step count when iteration starts.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the stream's position is a function of the trainer's step."""


class RecipeDataModule(lightning.LightningDataModule):
    """Tokenized train/val splits of a :class:`DataConfig` for ``classification`` or ``causal-lm``.

    ``setup()`` (idempotent; every public method calls it) reads the texts, keeps ``limit`` of
    them (seeded shuffle), splits them with ``torch.Generator().manual_seed(seed)`` (stratified
    per label for classification; by whole documents for causal-lm, so train and val never
    share a text) and tokenizes. Classification rows: ``input_ids``/``attention_mask``
    truncated to ``max_length`` plus ``labels``. Causal-LM rows: each split's documents
    concatenated (EOS between them when the tokenizer has one) and cut into blocks of exactly
    ``max_length`` tokens (``labels`` = ``input_ids``; the remainder is dropped). Passkey
    prompts are followed by their answer and kept one per row (padded to ``max_length``, the
    padding out of the loss), so a key and its question are never cut apart.

    ``train_dataloader()`` is a :class:`ResumableLoader` over a :class:`StepStream` whose start
    counter is the number of batches the trainer has consumed, read when each epoch's iteration
    begins: ``global_step * accumulate_grad_batches``, corrected for the partial accumulation
    Lightning steps on at an epoch's end when its batch count is no multiple of the
    accumulation (and for ``limit_train_batches``). A fine-tune killed and resumed from a
    mid-epoch checkpoint therefore sees exactly the batches of the run that went through (one
    optimizer, automatic optimization). Ranks come from ``trainer.world_size`` /
    ``trainer.global_rank``; without a trainer the stream starts at 0 on one rank.

    Example:
        >>> from headmods.convert import load_tokenizer, resolve_source
        >>> tok = load_tokenizer(resolve_source("minilm"))
        >>> dm = RecipeDataModule(DataConfig("bbc", limit=200, max_length=64), tok, task="classification")
        >>> dm.num_labels, dm.label_names[0], next(iter(dm.train_dataloader()))["input_ids"].shape
        (5, 'business', torch.Size([16, 64]))
    """

    def __init__(self, config: DataConfig, tokenizer: Any, *, task: str, cache_dir: PathLike | None = None) -> None:
        super().__init__()
        if not isinstance(config, DataConfig):
            raise ValueError(f"RecipeDataModule expects a DataConfig, got {type(config).__name__}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if task == "classification" and config.kind in ("pydoc", "passkey", "text"):
            raise ValueError(f"data kind {config.kind!r} has no labels; classification needs bbc/folder/json/parquet")
        self.config, self.tokenizer, self.task, self.cache_dir = config, tokenizer, task, cache_dir
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] | None = None
        self._label_names: list[str] | None = None
        self._info: dict[str, Any] = {}

    def _read(self) -> tuple[list[str], list[int] | None, list[str] | None]:
        cfg = self.config
        if cfg.kind == "pydoc":
            return pydoc_texts(), None, None
        if cfg.kind == "passkey":
            rows = passkey_samples(cfg.passkey_samples, filler_sentences=cfg.passkey_filler, seed=cfg.seed)
            return [f"{row['text']} {row['answer']}." for row in rows], None, None
        kind, path = ("folder", cfg.path or bbc_folder()) if cfg.kind == "bbc" else (cfg.kind, cfg.path)
        label_field = cfg.label_field if self.task == "classification" else None
        ds = load_local(kind, path, text_field=cfg.text_field, label_field=label_field, cache_dir=self.cache_dir,
                        sample_by=cfg.sample_by)  # fmt: skip
        if "label" not in ds.column_names:
            return list(ds["text"]), None, None
        return list(ds["text"]), list(ds["label"]), list(ds.features["label"].names)

    def _split(self, labels: list[int] | None, n: int) -> tuple[list[int], list[int]]:
        generator = torch.Generator().manual_seed(self.config.seed)
        groups: dict[int | None, list[int]] = {}
        for i in range(n):
            groups.setdefault(None if labels is None else labels[i], []).append(i)
        train, val = [], []
        for group, members in sorted(groups.items(), key=lambda item: -1 if item[0] is None else item[0]):
            if len(members) < 2:
                name = "documents" if group is None else f"examples of label {self._label_names[group]!r}"
                raise ValueError(f"too few samples to split: {len(members)} {name}, need >= 2 (one train, one val)")
            n_val = min(max(1, round(len(members) * self.config.val_fraction)), len(members) - 1)
            perm = torch.randperm(len(members), generator=generator).tolist()
            val += [members[k] for k in perm[:n_val]]
            train += [members[k] for k in perm[n_val:]]
        return sorted(train), sorted(val)

    def setup(self, stage: str | None = None) -> None:
        """Read, limit, split and tokenize (once; later calls return at once)."""
        if self.train_dataset is not None:
            return
        cfg = self.config
        texts, labels, self._label_names = self._read()
        if not texts:
            raise ValueError(f"empty dataset: data kind {cfg.kind!r} at {cfg.path!r} gave no texts")
        if cfg.limit is not None and cfg.limit < len(texts):
            keep = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.limit]
            texts = [texts[i] for i in keep.tolist()]
            labels = None if labels is None else [labels[i] for i in keep.tolist()]
        splits = dict(zip(("train", "val"), self._split(labels, len(texts))))
        if isinstance(self.tokenizer, BPEFactory):  # trained on the training split only
            self.tokenizer = self.tokenizer([texts[i] for i in splits["train"]])
        self._info = {"documents": {name: len(idx) for name, idx in splits.items()}}
        data = {}
        for name, idx in splits.items():
            if self.task == "classification":
                data[name] = self._classification_rows([texts[i] for i in idx], [labels[i] for i in idx])
                counts = sorted(Counter(labels[i] for i in idx).items())
                self._info.setdefault("label_counts", {})[name] = {self._label_names[k]: c for k, c in counts}
            elif cfg.kind == "passkey":
                data[name] = self._passkey_rows([texts[i] for i in idx], name)
            else:
                data[name] = self._lm_blocks([texts[i] for i in idx], name)
        self.train_dataset, self.val_dataset = data["train"], data["val"]

    def _classification_rows(self, texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.config.max_length)
        triples = zip(enc["input_ids"], enc["attention_mask"], labels)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label} for ids, mask, label in triples]

    def _lm_blocks(self, texts: list[str], split: str) -> list[dict[str, Any]]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        stream: list[int] = []
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += ids + ([eos] if eos is not None else [])
        size = self.config.max_length
        if len(stream) < size:
            raise ValueError(f"too few tokens for one {split} block: {len(texts)} {split} document(s) give "
                             f"{len(stream)} tokens, max_length is {size}")  # fmt: skip
        self._info.setdefault("tokens", {})[split] = len(stream)
        return [{"input_ids": stream[k : k + size], "labels": stream[k : k + size]}
                for k in range(0, len(stream) - size + 1, size)]  # fmt: skip

    def _passkey_rows(self, texts: list[str], split: str) -> list[dict[str, Any]]:
        """One row per prompt (never split across blocks), right-padded to ``max_length``; the loss
        covers the answer only (``passkey_loss: answer``) or every real token (``all``)."""
        size, rows = self.config.max_length, []
        for text in texts:
            prompt, answer = text.rsplit(" ", 1)  # "... The pass key is" + "NNNNN."
            p_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            ids = p_ids + a_ids
            if len(ids) > size:
                raise ValueError(f"a {split} passkey prompt has {len(ids)} tokens, more than max_length {size}; "
                                 f"lower data.passkey_filler ({self.config.passkey_filler}) or raise max_length")
            labels = ([-100] * len(p_ids) + a_ids) if self.config.passkey_loss == "answer" else list(ids)
            pad = size - len(ids)
            rows.append({"input_ids": ids + [self.pad_id] * pad, "labels": labels + [-100] * pad})
        self._info.setdefault("tokens", {})[split] = sum(len(r["input_ids"]) for r in rows)
        return rows

    @property
    def label_names(self) -> list[str] | None:
        """Class names in label-id order (classification); None for causal-lm."""
        self.setup()
        return list(self._label_names) if self.task == "classification" else None

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification); None for causal-lm."""
        return None if self.label_names is None else len(self.label_names)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked anyway)."""
        ids = (getattr(self.tokenizer, name, None) for name in ("pad_token_id", "eos_token_id"))
        return int(next((i for i in ids if i is not None), 0))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: kind, path, task, seed, split sizes and label (or token) counts."""
        self.setup()
        cfg = self.config
        fields = ("kind", "path", "seed", "limit", "val_fraction", "max_length")
        return {"task": self.task, **{name: getattr(cfg, name) for name in fields},
                "train_size": len(self.train_dataset), "val_size": len(self.val_dataset), **self._info}  # fmt: skip

    def _start_counter(self, stream: StepStream) -> int:
        """Batches the attached trainer has consumed (0 without one); see the class docstring."""
        trainer = self.trainer
        if trainer is None:
            return 0
        per_epoch, used = stream.batches_per_epoch, trainer.num_training_batches
        used = per_epoch if not math.isfinite(used) or used > per_epoch else int(used)
        accumulate, epoch = max(1, int(trainer.accumulate_grad_batches)), int(trainer.current_epoch)
        done_in_epoch = (trainer.global_step - epoch * math.ceil(used / accumulate)) * accumulate
        return epoch * per_epoch + min(max(done_in_epoch, 0), used)

    def train_dataloader(self) -> ResumableLoader:
        """The step-resumable training loader (see the class docstring and :class:`StepStream`)."""
        self.setup()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        stream = StepStream(self.train_dataset, batch_size=self.config.batch_size, seed=self.config.seed,
                            collate_fn=Collator(self.pad_id), world_size=world, rank=rank)  # fmt: skip
        stream.start_fn = lambda: self._start_counter(stream)
        # a private generator: creating the loader's iterator must not draw from torch's global RNG,
        # or a resumed run's dropout masks would drift from the uninterrupted run's
        return ResumableLoader(stream, batch_size=None, num_workers=0, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, ``eval_batch_size`` each, padded per batch."""
        self.setup()
        size = self.config.eval_batch_size
        return DataLoader(self.val_dataset, batch_size=size, shuffle=False, collate_fn=Collator(self.pad_id),
                          generator=torch.Generator())

    def calibration_batches(self, num_samples: int) -> list[dict[str, torch.Tensor]]:
        """The first ``num_samples`` training examples in epoch-0 order, in ``batch_size`` batches."""
        self.setup()
        n = len(self.train_dataset)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= n:
            raise ValueError(f"calibration needs 1 <= num_samples <= {n} (training examples), got {num_samples!r}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed))[:num_samples].tolist()
        collate, size = Collator(self.pad_id), self.config.batch_size
        return [collate([self.train_dataset[i] for i in order[k : k + size]]) for k in range(0, num_samples, size)]
