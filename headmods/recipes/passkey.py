"""Passkey retrieval: a five-digit key hidden in filler text at a chosen depth, asked for at the end.

The prompts follow the LongHeads / landmark-attention format (``text_sources.passkey_samples``):
filler sentences, the line "The pass key is NNNNN. Remember it. NNNNN is the pass key." after a
fraction ``depth`` of them, then "What is the pass key? The pass key is". :func:`passkey_prompt`
sizes a prompt to a target number of *tokens* for a given tokenizer.

Scoring is greedy decoding: the prompt is run once (prefill, with a KV cache), then the model
writes the answer a token at a time, and a trial counts as retrieved when it writes every token of
the key. (Appending the answer and reading all its logits in one forward would give the same
verdict for a strictly causal model, but not for LongHeads' block selection, where the queries of
the answer tokens would help choose the chunks the question reads.)

Example:
    >>> class Chars:  # a toy tokenizer: one token per character
    ...     def __call__(self, text, add_special_tokens=False):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> prompt = passkey_prompt(Chars(), 300, depth=0.5, key="12345")
    >>> 250 <= len(prompt.prompt_ids) <= 300 and prompt.answer_ids == [ord(c) for c in " 12345"]
    True
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .text_sources import _FILLER, _QUESTION

__all__ = ["PasskeyPrompt", "passkey_prompt", "passkey_accuracy", "greedy_answer"]


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
                hits += greedy_answer(model, p.prompt_ids, len(p.answer_ids), device) == p.answer_ids
            row.append(hits / trials)
        grid[int(length)] = row
    return grid


@torch.no_grad()
def greedy_answer(model: nn.Module, prompt_ids: list[int], n: int, device: torch.device | str = "cpu") -> list[int]:
    """The ``n`` tokens greedy decoding writes after the prompt (prefill once, then one token per step)."""
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    written = [int(out.logits[0, -1].argmax())]
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.x / 4.x
    while len(written) < n:
        cache = out.get("cache", None) or out.get("past_key_values", None)
        out = model(input_ids=torch.tensor([written[-1:]], device=device), use_cache=True, **{name: cache})
        written.append(int(out.logits[0, -1].argmax()))
    return written
