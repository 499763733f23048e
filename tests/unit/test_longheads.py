"""LongHeads: exact below the budget, selection vs a naive per-token loop, blocks, cache, bad input."""

import math

import pytest
import torch

import headmods
from headmods import KVCache, LongHeadsAttention
from headmods.functional.longheads import longheads_attention
from reference import rope_loop

THETA = 100.0


def _naive_reps(q, k, v, w):
    """Per (batch, head, chunk): local RoPE, non-causal attention, mean, then the attention-weighted key."""
    B, h, T, d = q.shape
    groups = h // k.size(1)
    G = T // w
    reps = torch.zeros(B, h, G, d, dtype=torch.float64)
    local = torch.arange(w)
    for b in range(B):
        for i in range(h):
            j = i // groups
            for g in range(G):
                qc = rope_loop(q[b, i, g * w:(g + 1) * w], local, THETA)
                kc = rope_loop(k[b, j, g * w:(g + 1) * w], local, THETA)
                vc = v[b, j, g * w:(g + 1) * w].double()
                o = torch.softmax(qc @ kc.T / math.sqrt(d), dim=-1) @ vc
                s = o.mean(dim=0)
                reps[b, i, g] = torch.softmax(kc @ s / math.sqrt(d), dim=0) @ kc
    return reps


def _naive(q, k, v, w, attend, begin, block=1, query_position=None):
    """The LongHeads rule, one query at a time; a block selects by its tokens' best chunk probabilities."""
    B, h, T, d = q.shape
    groups = h // k.size(1)
    K = attend // w
    reps = _naive_reps(q, k, v, w)
    out = torch.zeros(B, h, T, d, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            j = i // groups
            for t in range(T):
                if t < begin:  # full causal attention at the original positions
                    qt = rope_loop(q[b, i, t:t + 1], torch.tensor([t]), THETA)[0]
                    ks = rope_loop(k[b, j, :t + 1], torch.arange(t + 1), THETA)
                    weights = torch.softmax(ks @ qt / math.sqrt(d), dim=0)
                    out[b, i, t] = weights @ v[b, j, :t + 1].double()
                    continue
                cur = t // w
                first = max(begin, (t // block) * block)
                last = min(T, (t // block + 1) * block)
                eligible = list(range(1, cur - 1))
                scores = {g: 0.0 for g in eligible}
                for u in range(first, last):  # a block keeps each chunk's best probability over its tokens
                    probs = {g: 0.0 for g in eligible}
                    for i2 in range(j * groups, (j + 1) * groups):  # mean over the kv head's query heads
                        qu = q[b, i2, u].double()
                        if query_position is not None:
                            qu = rope_loop(qu[None], torch.tensor([query_position]), THETA)[0]
                        logits = {g: float(qu @ reps[b, i2, g]) / math.sqrt(d) for g in eligible}
                        top = max(logits.values(), default=0.0)
                        norm = sum(math.exp(x - top) for x in logits.values())
                        for g in eligible:
                            probs[g] += math.exp(logits[g] - top) / norm / groups
                    for g in eligible:
                        scores[g] = max(scores[g], probs[g])
                best = sorted(scores, key=lambda g: -scores[g])[:K - 3]
                chosen = sorted([0, cur - 1, cur] + best)
                positions = [g * w + r for g in chosen for r in range(w) if g * w + r <= t]
                ks = rope_loop(k[b, j, positions], torch.arange(len(positions)), THETA)
                qt = rope_loop(q[b, i, t:t + 1], torch.tensor([len(positions) - 1]), THETA)[0]
                weights = torch.softmax(ks @ qt / math.sqrt(d), dim=0)
                out[b, i, t] = weights @ v[b, j, positions].double()
    return out


def _qkv(h=4, h_kv=2, T=44, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1 + 1, h, T, d, generator=g, dtype=torch.float64),
            torch.randn(2, h_kv, T, d, generator=g, dtype=torch.float64),
            torch.randn(2, h_kv, T, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("block,query_position", [(1, None), (2, None), (4, None), (1, 11), (4, 11)])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_selection_equals_a_naive_loop(block, query_position, heads):
    w, attend, begin = 4, 20, 20  # K = 5: first, previous, current + the best 2
    q, k, v = _qkv(*heads)
    expected = _naive(q, k, v, w, attend, begin, block, query_position)
    from headmods.functional.longheads import chunk_representations

    reps = chunk_representations(q[:, :, :40], k[:, :, :40], v[:, :, :40], w, THETA)
    torch.testing.assert_close(reps, _naive_reps(q[:, :, :40], k[:, :, :40], v[:, :, :40], w), atol=1e-6, rtol=1e-6)
    out = longheads_attention(q, k, v, reps, chunk_size=w, attend_length=attend, begin=begin, theta=THETA,
                              q_start=0, block=block, query_position=query_position)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # RoPE angles are float32, as in HF


def _layer(selection="token", **kw):
    torch.manual_seed(0)
    cfg = dict(chunk_size=4, attend_length=16, rope_theta=THETA, batch_first=True, num_kv_heads=2)
    return LongHeadsAttention(32, 4, dtype=torch.float64, selection=selection, **{**cfg, **kw}).eval()


def test_output_equals_standard_attention_when_the_sequence_fits():
    layer = _layer()
    mha = headmods.MultiHeadAttention(32, 4, num_kv_heads=2, rope_theta=THETA, batch_first=True,
                                      dtype=torch.float64).eval()
    mha.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    assert torch.equal(layer(x, is_causal=True)[0], mha(x, is_causal=True)[0])


@pytest.mark.parametrize("selection", ["token", "block"])
def test_cached_decoding_equals_the_full_forward(selection):
    layer = _layer(selection)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    full = _layer("token")(x, is_causal=True)[0]  # decoding selects per token in both modes
    cache = KVCache()
    parts = [layer(x[:, :10], is_causal=True, cache=cache)[0]]
    parts += [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(10, 37)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-10, rtol=1e-10)
    state = cache.layer_states[layer]  # the selection state lives in the cache, not on the layer
    assert state.reps.size(2) == 9 and state.q_tail.size(2) == 1


def test_block_mode_differs_from_token_mode_only_past_the_budget():
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    token, block = _layer("token")(x, is_causal=True)[0], _layer("block")(x, is_causal=True)[0]
    torch.testing.assert_close(token[:, :16], block[:, :16], atol=0, rtol=0)
    assert not torch.allclose(token[:, 16:], block[:, 16:])


def test_the_state_refuses_a_cache_of_another_sequence():
    layer = _layer()
    cache, other = KVCache(), KVCache()
    layer(torch.randn(1, 8, 32, dtype=torch.float64), is_causal=True, cache=cache)
    other.update(torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64))
    with pytest.raises(headmods.errors.CacheStateError, match="cache holds 5 tokens but its selection state was "
                       "built on 0"):
        layer(torch.randn(1, 1, 32, dtype=torch.float64), is_causal=True, cache=other)


@pytest.mark.parametrize("settings, message", [
    (dict(attend_length=18), r"attend_length \(18\) must be a multiple of chunk_size \(4\)"),
    (dict(attend_length=8), r"at least 3 chunks .* 8 / 4 = 2"),
    (dict(rope_theta=None), r"LongHeads re-positions keys with rotary embeddings; this layer has none"),
    (dict(begin_selective_length=12), r"begin_selective_length \(12\) must be .* at least attend_length \(16\)"),
    (dict(selection="tokens"), r"selection must be one of \('block', 'token'\)"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        _layer(**settings)


def test_padding_and_non_causal_calls_are_refused():
    layer = _layer()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="causal self-attention"):
        layer(x)
    with pytest.raises(ValueError, match="unpadded batches"):
        layer(x, is_causal=True, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool).index_fill(1, torch.tensor([0]), True))


def test_swap_into_a_model_without_rope_is_refused():
    from .test_swap import tiny_bert

    with pytest.raises(ValueError, match="no rope_theta"):
        headmods.swap(tiny_bert(), "longheads", chunk_size=4, attend_length=16)


def test_hf_attention_function_equals_the_swap_path_and_decodes():
    import copy

    from transformers import DynamicCache

    from headmods.integrations.hf.longheads_fn import use_longheads

    from .test_swap import V, tiny_llama

    torch.manual_seed(0)
    base = tiny_llama(rope_theta=THETA, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    swapped, functional = copy.deepcopy(base), copy.deepcopy(base)
    report = headmods.swap(swapped, "longheads", chunk_size=4, attend_length=16, selection="token")
    assert swapped.model.layers[0].self_attn.config.rope_theta == THETA and len(report.replaced) == 2
    assert len(use_longheads(functional, chunk_size=4, attend_length=16, selection="token")) == 2
    ids = torch.randint(1, V, (2, 41))
    with torch.no_grad():
        a = swapped(ids).logits
        b = functional(ids).logits
        short = base(ids[:, :16]).logits
        cache = DynamicCache(config=functional.config)
        steps = [functional(ids[:, :20], cache=cache, use_cache=True).logits]
        steps += [functional(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(20, 41)]
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[:, :16], short, atol=1e-5, rtol=1e-5)  # within the budget: the plain model
    assert not torch.allclose(a[:, 30:], base(ids).logits[:, 30:], atol=1e-3)  # past it: heads see chunks only


def test_gradients_flow_through_the_selected_chunks():
    layer = _layer("block").train()
    x = torch.randn(1, 40, 32, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x, is_causal=True)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and layer.k_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the no-grad path (reused buffers) computes the same thing
        torch.testing.assert_close(layer(x, is_causal=True)[0], out.detach(), atol=1e-12, rtol=1e-12)


def test_block_path_with_one_token_blocks_equals_the_batched_per_token_path():
    q, k, v = _qkv(4, 2, T=70)
    from headmods.functional.longheads import chunk_representations

    reps = chunk_representations(q[:, :, :68], k[:, :, :68], v[:, :, :68], 4, THETA)
    kw = dict(chunk_size=4, attend_length=20, begin=20, theta=THETA, q_start=0, block=1)
    batched = longheads_attention(q, k, v, reps, **kw)
    looped = longheads_attention(q, k, v, reps, batch_tokens=False, **kw)
    torch.testing.assert_close(batched, looped, atol=1e-12, rtol=1e-12)


def test_non_contiguous_head_groups_are_refused():
    layer = _layer()  # 4 query heads on 2 kv heads
    with pytest.raises(ValueError, match="contiguous query-head groups"):
        LongHeadsAttention(32, 4, chunk_size=4, attend_length=16, rope_theta=THETA, num_kv_heads=2,
                           kv_map=(0, 1, 0, 1))
    with pytest.raises(ValueError, match="contiguous query-head groups"):
        layer.prune_heads([0, 1, 2])  # leaves groups of 2 and 1
    assert layer.num_heads == 4 and layer.q_proj.weight.shape == (32, 32)  # refused before any weight changed
    assert layer.prune_heads([0, 1]).num_kv_heads == 1  # a whole group is fine


@pytest.mark.parametrize("block", [1, 4])
def test_inference_path_one_head_per_call_and_a_partial_chunk(monkeypatch, block):
    """The no-grad block loop in its other shapes: one key/value head per SDPA call (as on long
    inputs), a sequence ending inside a chunk, GQA; against the naive loop."""
    import headmods.functional.longheads as lh

    monkeypatch.setattr(lh, "_GROUP_BYTES", 1)
    w, attend, begin = 4, 20, 20
    q, k, v = _qkv(4, 2, T=43)
    reps = lh.chunk_representations(q[:, :, :40], k[:, :, :40], v[:, :, :40], w, THETA)
    with torch.no_grad():
        out = longheads_attention(q, k, v, reps, chunk_size=w, attend_length=attend, begin=begin, theta=THETA,
                                  q_start=0, block=block, batch_tokens=False)
    torch.testing.assert_close(out, _naive(q, k, v, w, attend, begin, block), atol=1e-6, rtol=1e-6)


def test_bfloat16_inputs_are_attended_in_float32():
    w, attend, begin = 4, 20, 20
    q, k, v = (x.float() for x in _qkv(4, 2, T=44))
    kw = dict(chunk_size=w, attend_length=attend, begin=begin, theta=THETA, q_start=0, block=w)
    with torch.no_grad():
        from headmods.functional.longheads import chunk_representations

        low = [x.bfloat16() for x in (q, k, v)]
        reps = chunk_representations(*(x[:, :, :40] for x in low), w, THETA)
        out = longheads_attention(*low, reps, **kw)
        ref = longheads_attention(*(x.float() for x in low), reps.float(), **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
