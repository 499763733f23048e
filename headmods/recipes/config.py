"""Recipe configuration: YAML files in ``recipes/`` read into frozen, strictly checked dataclasses.

A recipe file has one section per concern::

    recipe: finetune            # convert | finetune | prune | eval | demo
    output_dir: checkpoints/runs/minilm-bbc
    model: {source: minilm, variant: mha, task: classification}
    data:  {kind: bbc, max_length: 128, val_fraction: 0.2, seed: 0}
    train: {max_steps: 120, lr: 5.0e-5, batch_size: 16}
    prune: {importance: taylor, ratio: 0.5, recover_steps: 40}
    bench: {batch_size: 16, seq_len: 128}

Every key is checked: a misspelled one is an error that names it, the section, and the keys that
section knows. Command-line overrides use the same dotted names: ``train.max_steps=2``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .data import DataConfig, TASKS

__all__ = ["ModelConfig", "TrainConfig", "PruneConfig", "BenchConfig", "CompareConfig", "RecipeConfig", "load_config",
           "apply_overrides", "RECIPES", "TASKS"]

RECIPES = ("convert", "finetune", "prune", "eval", "demo", "compare", "shrp", "dha", "passkey")


def _strict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"{where} knows: {', '.join(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _number(name: str, value: Any, low: float, high: float | None = None, *, open_low: bool = False,
            open_high: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number (not a bool) in the given range.

    Example:
        >>> _number("lr", "fast", 0, open_low=True)
        Traceback (most recent call last):
        ValueError: lr must be a number > 0, got 'fast' (str)
    """
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if open_low else value >= low)
          and (high is None or (value < high if open_high else value <= high)))
    if ok:
        return
    if high is None:
        expected = f"{'>' if open_low else '>='} {low}"
    else:
        expected = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = " (YAML reads 5e-5 as text: write 5.0e-5)"
        except ValueError:
            pass
    raise ValueError(f"{name} must be a number {expected}, got {value!r} ({type(value).__name__}){hint}")


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and what it becomes."""

    source: str | None = "minilm"  # known short name, HF folder or .gguf file
    checkpoint: str | None = None  # a headmods folder to start from instead of ``source``
    variant: str | None = "mha"  # headmods variant swapped in (None: keep the host attention)
    variant_config: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    scratch: dict[str, Any] | None = None  # a transformers config (model_type + sizes): a fresh model
    tokenizer: str | None = None  # with scratch: "bpe:VOCAB" trains a BPE tokenizer on the training split

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.scratch is not None:
            if not isinstance(self.scratch, dict) or "model_type" not in self.scratch:
                raise ValueError("model.scratch must be a mapping with a model_type (e.g. llama) and sizes")
            if self.tokenizer is None:
                raise ValueError("model.scratch needs model.tokenizer (e.g. bpe:512)")
        elif self.source is None and self.checkpoint is None:
            raise ValueError("give model.source (a checkpoint name or path) or model.checkpoint (a headmods folder)")
        if self.variant is not None:
            from ..registry import get_variant

            get_variant(self.variant)  # unknown names fail here, before anything is loaded
        if not isinstance(self.variant_config, dict):
            raise ValueError(f"variant_config must be a mapping, got {type(self.variant_config).__name__}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization and Lightning trainer settings."""

    max_steps: int = 100
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    aux_weight: float = 1.0  # multiplier on the mean over layers of routed layers' (already weighted) aux losses
    checkpoint_every_n_steps: int = 50  # resumable Lightning checkpoint (last.ckpt)
    log_every_n_steps: int = 10
    seed: int = 0
    devices: int | str = 1
    accelerator: str = "cpu"
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _positive("max_steps", self.max_steps, allow_zero=True)
        _positive("checkpoint_every_n_steps", self.checkpoint_every_n_steps)
        _positive("log_every_n_steps", self.log_every_n_steps)
        _positive("accumulate_grad_batches", self.accumulate_grad_batches)
        _positive("seed", self.seed, allow_zero=True)
        if not isinstance(self.devices, str) and self.devices != -1:
            _positive("devices (or -1 for all, or a string such as auto)", self.devices)
        _number("lr", self.lr, 0, open_low=True)
        _number("weight_decay", self.weight_decay, 0)
        _number("warmup_ratio", self.warmup_ratio, 0, 1, open_high=True)
        _number("aux_weight", self.aux_weight, 0)


@dataclass(frozen=True)
class PruneConfig:
    """Head-importance scoring, the pruning plan and the recovery fine-tune."""

    importance: str = "taylor"  # magnitude | ablation | taylor
    ratio: float = 0.5
    uniform: bool = True  # same head count in every layer (needed for stock HF export)
    ignore: tuple[str, ...] = ()
    min_heads: int = 1
    calib_samples: int = 128
    recover_steps: int = 0

    def __post_init__(self) -> None:
        if self.importance not in ("magnitude", "ablation", "taylor"):
            raise ValueError(f"importance must be magnitude, ablation or taylor, got {self.importance!r}")
        _number("ratio", self.ratio, 0, 1, open_high=True)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        _positive("min_heads", self.min_heads)
        _positive("calib_samples", self.calib_samples)
        _positive("recover_steps", self.recover_steps, allow_zero=True)


@dataclass(frozen=True)
class BenchConfig:
    """Encoder/decoder forward timing in reports."""

    batch_size: int = 16
    seq_len: int = 128
    rounds: int = 5

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "rounds"):
            _positive(name, getattr(self, name), allow_zero=name == "rounds")


@dataclass(frozen=True)
class SHRPStageConfig:
    """The SHRP pipeline: usage pruning threshold, the threshold sweep, dropping attention sublayers."""

    threshold: float = 0.05  # keep heads routed at least this fraction of calibration tokens
    sweep: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2)  # thresholds for the accuracy-vs-parameters curve
    drop_below: float | None = None  # also drop attention sublayers contributing less (||y|| / ||x||)
    baseline: bool = True  # fine-tune plain MHA with the same settings for comparison
    extreme_keep_layers: int | None = 1  # the extreme setting: attention kept in this many layers

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep", tuple(self.sweep))
        _number("threshold", self.threshold, 0, 1)
        for value in self.sweep:
            _number("each sweep threshold", value, 0, 1)
        if self.drop_below is not None:
            _number("drop_below", self.drop_below, 0)
        if self.extreme_keep_layers is not None:
            _positive("extreme_keep_layers", self.extreme_keep_layers)


@dataclass(frozen=True)
class DHAStageConfig:
    """The DHA pipeline: budget, grouping, fusion stage, continued training, GQA baseline."""

    budget: float = 0.5  # kept fraction of all key and value heads
    linkage: str = "lsq"  # lsq | similarity (CKA): which pair of groups merges next in a layer side
    calib_samples: int = 64  # training examples whose activations give the head statistics
    fusion_steps: int = 40  # steps of the fusion stage (LM loss + augmented Lagrangian fusion loss)
    fusion_lr: float = 0.05  # learning rate of the fusion weights
    fusion_mu: float = 10.0  # quadratic weight of the augmented Lagrangian
    fusion_dual_lr: float = 50.0  # dual ascent step of the multiplier
    fusion_train_model: bool = True  # also train the model's weights during fusion (else only the fusion weights)
    fusion_consensus_ramp: float = 0.25  # last fraction of fusion steps blending heads to their group mean (0: off)
    pretrain_steps: int = 0  # model.scratch: train the MHA source from scratch first
    eval_every: int = 10  # held-out loss every this many steps (curves)
    eval_batches: int = 8  # validation batches per curve point (the final evaluation uses all)
    baseline: bool = True  # GQA mean-pool at the same budget, same total training tokens

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise ValueError(f"dha.budget must be a fraction of the K/V heads in (0, 1], got {self.budget!r}")
        if self.linkage not in ("similarity", "lsq"):
            raise ValueError(f"dha.linkage must be 'similarity' or 'lsq', got {self.linkage!r}")
        for name in ("calib_samples", "eval_every", "eval_batches"):
            _positive(f"dha.{name}", getattr(self, name))
        for name in ("fusion_steps", "pretrain_steps"):
            _positive(f"dha.{name}", getattr(self, name), allow_zero=True)
        if not isinstance(self.fusion_consensus_ramp, (int, float)) or not 0 <= self.fusion_consensus_ramp <= 1:
            raise ValueError(f"dha.fusion_consensus_ramp must lie in [0, 1], got {self.fusion_consensus_ramp!r}")
        for name in ("fusion_lr", "fusion_mu", "fusion_dual_lr"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"dha.{name} must be a number >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PasskeyStageConfig:
    """The passkey recipe: LongHeads settings and the length x depth grid (full attention vs LongHeads)."""

    chunk_size: int = 32
    attend_length: int = 256  # at most the model's trained length
    selection: str = "block"  # block | token
    lengths: tuple[int, ...] = (256, 1024, 4096)  # prompt lengths in tokens
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the key sits in the filler
    trials: int = 10  # prompts per (length, depth)
    compare_token: bool = True  # also score the official per-token selection next to block selection
    query_position: int | None = None  # None: chunks scored with the un-roped query (official); int: roped there
    compare_unroped: bool = False  # with query_position set, also score the official un-roped query

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(self.lengths))
        object.__setattr__(self, "depths", tuple(self.depths))
        for name in ("chunk_size", "attend_length", "trials"):
            _positive(f"passkey.{name}", getattr(self, name))
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 32 for n in self.lengths):
            raise ValueError(f"passkey.lengths must be token counts >= 32, got {self.lengths!r}")
        if not self.depths or any(not isinstance(x, (int, float)) or not 0 <= x <= 1 for x in self.depths):
            raise ValueError(f"passkey.depths must be fractions in [0, 1], got {self.depths!r}")
        from ..functional.longheads import check_longheads

        check_longheads(self.chunk_size, self.attend_length, self.attend_length,
                        self.chunk_size if self.selection == "block" else 1)
        if self.selection not in ("block", "token"):
            raise ValueError(f"passkey.selection must be 'block' or 'token', got {self.selection!r}")
        qp = self.query_position
        if qp is not None and (isinstance(qp, bool) or not isinstance(qp, int) or qp < 0):
            raise ValueError(f"passkey.query_position must be null or a non-negative int, got {qp!r}")


@dataclass(frozen=True)
class CompareConfig:
    """Variants trained from the same random init, per seed, at equal steps (the ``compare`` recipe).

    A variant entry is ``{variant: NAME, variant_config: {...}, positions: rope | absolute | none}``
    (``positions`` defaults to ``rope``; see :mod:`headmods.recipes.positions`).
    """

    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {variant, variant_config, positions}
    seeds: tuple[int, ...] = (0,)
    eval_every: int = 25  # validation-loss curve point every this many steps (and at the start and the end)
    eval_batches: int = 8  # validation batches per curve point (the final evaluation uses all)
    param_tolerance: float = 0.02  # the report warns when a variant's parameters differ more from the first's

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.variants:
            raise ValueError("compare.variants needs at least one entry: name -> {variant: ..., variant_config: {...}}")
        for name, spec in self.variants.items():
            _check_compared(name, spec)
        if not self.seeds:
            raise ValueError("compare.seeds needs at least one seed")
        _positive("compare.eval_every", self.eval_every)
        _positive("compare.eval_batches", self.eval_batches)
        tol = self.param_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"compare.param_tolerance must be a fraction >= 0 (0.02 = 2 %), got {tol!r}")


def _check_compared(name: str, spec: Any) -> None:
    """One ``compare.variants`` entry: known keys, a registered variant, usable ``positions``."""
    from ..registry import get_variant
    from .positions import check_positions

    keys = {"variant", "variant_config", "positions"}
    if not isinstance(spec, dict) or set(spec) - keys or "variant" not in spec:
        raise ValueError(f"compare.variants.{name} must be {{variant: NAME, variant_config: {{...}}, positions: "
                         f"rope | absolute | none}}, got {spec!r}")
    get_variant(spec["variant"])
    if not isinstance(spec.get("variant_config", {}), dict):
        raise ValueError(f"compare.variants.{name}.variant_config must be a mapping, "
                         f"got {type(spec['variant_config']).__name__}")
    check_positions(name, spec["variant"], spec.get("positions", "rope"))


@dataclass(frozen=True)
class RecipeConfig:
    """A whole recipe run."""

    recipe: str
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    compare: CompareConfig | None = None
    shrp: SHRPStageConfig = field(default_factory=SHRPStageConfig)
    dha: DHAStageConfig = field(default_factory=DHAStageConfig)
    passkey: PasskeyStageConfig = field(default_factory=PasskeyStageConfig)
    verify: bool = True  # convert: check the converted model against the source on real inputs

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.recipe == "compare" and (self.compare is None or self.model.scratch is None):
            raise ValueError("the compare recipe needs a compare section and model.scratch (models from scratch)")
        if self.recipe in ("finetune", "prune", "eval", "demo", "compare", "shrp", "dha") and self.data is None:
            raise ValueError(f"the {self.recipe} recipe needs a data section")
        if (self.recipe == "convert" and self.model.task == "classification" and self.data is None
                and self.model.checkpoint is None):
            raise ValueError("converting for classification needs a data section (its labels size the classifier)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "RecipeConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a YAML mapping, got {type(data).__name__}")
        sections = {"model": ModelConfig, "train": TrainConfig, "prune": PruneConfig, "bench": BenchConfig,
                    "shrp": SHRPStageConfig, "dha": DHAStageConfig, "passkey": PasskeyStageConfig}
        if data.get("compare") is not None:
            sections["compare"] = CompareConfig
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown top-level key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in "
                              f"{where}; known: {', '.join(known)}")
        values = dict(data)
        for name, section in sections.items():
            values[name] = _strict(section, data.get(name), name)
        if data.get("data") is not None:
            if not isinstance(data["data"], dict):
                raise ConfigError(f"data must be a mapping of keys, got {type(data['data']).__name__}")
            try:
                values["data"] = DataConfig.from_dict(data["data"])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"data: {e}") from None
        for key in ("recipe", "output_dir"):
            if key not in data:
                raise ConfigError(f"{where} needs the key {key!r}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=2", "data.path=/x"]`` applied to the raw YAML mapping (a copy)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML file, apply ``key=value`` overrides, and check everything."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    return RecipeConfig.from_dict(apply_overrides(data or {}, overrides or []), where=str(path))
