"""Passkey scoring: greedy decoding after a prefill, against a loop that re-reads the whole prefix."""

import copy

import torch

import headmods
from headmods.recipes.passkey import greedy_answer


def _argmax_loop(model, prompt, n):
    """Greedy decoding with no cache: one full forward per written token."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_answer_equals_uncached_greedy_decoding():
    from .test_swap import V, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(rope_theta=100.0)
    prompt = torch.randint(1, V, (45,)).tolist()
    assert greedy_answer(model, prompt, 6) == _argmax_loop(model, prompt, 6)
    lh = copy.deepcopy(model)  # LongHeads with per-token selection is causal: the cache changes nothing
    headmods.swap(lh, "longheads", chunk_size=4, attend_length=16, selection="token", query_position=8)
    written = greedy_answer(lh, prompt, 6)
    assert written == _argmax_loop(lh, prompt, 6) and len(written) == 6
