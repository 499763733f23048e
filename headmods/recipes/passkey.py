"""Passkey retrieval: a five-digit key hidden in filler text at a chosen depth, asked for at the end.

The prompts follow the LongHeads / landmark-attention format (``text_sources.passkey_samples``):
filler sentences, the line "The pass key is NNNNN. Remember it. NNNNN is the pass key." after a
fraction ``depth`` of them, then "What is the pass key? The pass key is". :func:`passkey_prompt`
sizes a prompt to a target number of *tokens* for a given tokenizer.

Scoring is one forward per prompt: the answer's tokens are appended and a trial counts as
retrieved when the model's argmax at every answer position is the right token, which is exactly
when greedy decoding would write the key (teacher forcing changes nothing while every token is
right).

Example:
    >>> class Chars:  # a toy tokenizer: one token per character
    ...     def __call__(self, text, add_special_tokens=False):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> prompt = passkey_prompt(Chars(), 300, depth=0.5, key="12345")
    >>> 250 <= len(prompt.prompt_ids) <= 300 and prompt.answer_ids == [ord(c) for c in " 12345"]
    True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .text_sources import _FILLER, _QUESTION

__all__ = ["PasskeyPrompt", "passkey_prompt", "passkey_accuracy"]


@dataclass
class PasskeyPrompt:
    prompt_ids: list[int]
    answer_ids: list[int]
    key: str
    depth: float


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer: Any, length: int, *, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens (prompt + answer), the key line after ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    line = f"The pass key is {key}. Remember it. {key} is the pass key."
    answer = _ids(tokenizer, f" {key}")
    fixed = len(_ids(tokenizer, line + "\n" + _QUESTION)) + len(answer) + 2
    sentence = max(1, len(_ids(tokenizer, " ".join(_FILLER))) / len(_FILLER))
    n = max(1, int((length - fixed) / sentence))
    while True:
        filler = [_FILLER[i % len(_FILLER)] for i in range(n)]
        cut = round(depth * n)
        parts = [" ".join(filler[:cut]), line, " ".join(filler[cut:]), _QUESTION]
        ids = _ids(tokenizer, "\n".join(p for p in parts if p))
        if len(ids) + len(answer) <= length or n == 1:
            return PasskeyPrompt(ids, answer, key, depth)
        n = max(1, n - max(1, (len(ids) + len(answer) - length) // max(1, int(sentence))))


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], *,
                     trials: int, seed: int = 0) -> dict[int, list[float]]:
    """Fraction of trials retrieved, per length (rows) and depth (columns); the model runs in eval mode."""
    model.eval()
    rng = random.Random(seed)
    grid: dict[int, list[float]] = {}
    device = next(model.parameters()).device
    for length in lengths:
        row = []
        for depth in depths:
            hits = 0
            for _ in range(trials):
                p = passkey_prompt(tokenizer, length, depth=depth, key=str(rng.randint(10000, 99999)))
                ids = torch.tensor([p.prompt_ids + p.answer_ids], device=device)
                logits = model(input_ids=ids).logits[0]
                start = len(p.prompt_ids) - 1  # the logits that predict the first answer token
                predicted = logits[start:start + len(p.answer_ids)].argmax(dim=-1).tolist()
                hits += predicted == p.answer_ids
            row.append(hits / trials)
        grid[int(length)] = row
    return grid
