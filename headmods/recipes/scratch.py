"""From-scratch models for comparison recipes: a small BPE tokenizer and a fresh transformers model.

``model.scratch`` in a recipe is a transformers config (``model_type`` plus sizes, e.g. a 4-layer
LLaMA of width 256); ``model.tokenizer: "bpe:512"`` trains a byte-level BPE tokenizer of that
vocabulary size on the *training split* only, in memory, in about a second (tokenizers library,
which transformers already depends on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["BPEFactory", "parse_tokenizer_spec", "scratch_model"]

SPECIAL = ("<pad>", "<eos>")


class BPEFactory:
    """Called with the training texts, returns a transformers fast tokenizer (``<pad>``, ``<eos>``)."""

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
            raise ValueError(f"a byte-level BPE vocabulary needs at least 300 entries, got {vocab_size!r}")
        self.vocab_size = vocab_size

    def __call__(self, texts: Sequence[str]) -> Any:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=self.vocab_size, special_tokens=list(SPECIAL),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def parse_tokenizer_spec(spec: str) -> BPEFactory:
    """``"bpe:512"`` -> a :class:`BPEFactory` of 512 entries."""
    kind, _, size = spec.partition(":")
    if kind != "bpe" or not size.isdigit():
        raise ValueError(f"model.tokenizer must look like 'bpe:VOCAB_SIZE' (e.g. bpe:512), got {spec!r}")
    return BPEFactory(int(size))


def scratch_model(config: dict[str, Any], tokenizer: Any) -> nn.Module:
    """A randomly initialized transformers causal LM built from ``config`` (``model_type`` + sizes)."""
    import transformers

    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.scratch needs a model_type (e.g. llama) and its sizes")
    values.setdefault("vocab_size", len(tokenizer))
    values.setdefault("pad_token_id", tokenizer.pad_token_id)
    values.setdefault("eos_token_id", tokenizer.eos_token_id)
    values.setdefault("bos_token_id", tokenizer.eos_token_id)
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **values)
    except (KeyError, ValueError) as e:
        raise ValueError(f"model.scratch: {e}") from None
    return transformers.AutoModelForCausalLM.from_config(cfg).float()
