"""RCMHA: the causal convolution and relative logits against explicit loops, the MHA reduction,
cached decoding, gradients, settings, hosts, switches and pruning."""

import copy
import math

import pytest
import torch
from torch import nn

import headmods
from headmods import KVCache, MultiHeadAttention, RCMHAConfig, RCMHAttention
from headmods.functional.masks import AttentionMask
from headmods.functional.relative import (causal_depthwise_conv, offset_keys, offset_logits, offset_rows,
                                         relative_index, relative_logits, skew)
from reference import contiguous_groups, naive_attention, rope_loop

B, d = 2, 4
THETA = 100.0


# -- independent references ---------------------------------------------------------------------
def clipped_row(delta, P):
    """2P rows: offsets 0..P-1 at rows P..2P-1, offsets -1..-P at rows P-1..0, farther ones clipped."""
    return P + max(-P, min(delta, P - 1))


def t5_bucket(relative_position, num_buckets, max_distance):
    """T5's bidirectional bucket (mesh_tensorflow ``_relative_position_bucket``), for one int.

    ``relative_position`` is key position - query position, as T5 defines it.
    """
    ret = 0
    n = -relative_position
    num_buckets //= 2
    if n < 0:
        ret += num_buckets
    n = abs(n)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val_if_large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                                   * (num_buckets - max_exact))
    return ret + min(val_if_large, num_buckets - 1)


def conv_loop(x, weight, bias, prev=None):
    """x (B, h, T, d): y[t] = sum over taps m of weight[m] * x[t - (K-1-m)] + bias, zeros before the start."""
    x, weight, bias = x.detach().double(), weight.detach().double(), bias.detach().double()
    Bx, h, T, dx = x.shape
    K = weight.size(-1)
    seq = x if prev is None else torch.cat([prev.detach().double(), x], dim=2)
    start = seq.size(2) - T
    y = torch.zeros(Bx, h, T, dx, dtype=torch.float64)
    for b in range(Bx):
        for head in range(h):
            w = weight[head] if weight.dim() == 3 else weight  # (d, K)
            bb = bias[head] if bias.dim() == 2 else bias
            for t in range(T):
                for c in range(dx):
                    total = float(bb[c])
                    for m in range(K):
                        src = start + t - (K - 1 - m)
                        if src >= 0:
                            total += float(w[c, m]) * float(seq[b, head, src, c])
                    y[b, head, t, c] = total
    return y


def naive_layer(layer, x, *, causal, padding=None, rope=False):
    """The whole layer for x (B, T, D) by loops: convs, relative term per (b, head, i, j), attention."""
    c = layer.config
    Bx, T, _ = x.shape
    h, hk = c.num_heads, c.num_kv_heads
    x = x.detach().double()

    def heads(linear, n):
        y = x @ linear.weight.detach().double().t() + linear.bias.detach().double()
        return y.view(Bx, T, n, c.head_dim).transpose(1, 2)  # (B, n, T, d)

    q, k, v = heads(layer.q_proj, h), heads(layer.k_proj, hk), heads(layer.v_proj, hk)
    if c.conv:
        q = conv_loop(q, layer.q_conv.weight, layer.q_conv.bias)
        k = conv_loop(k, layer.k_conv.weight, layer.k_conv.bias)
        v = conv_loop(v, layer.v_conv.weight, layer.v_conv.bias)
    scale = c.scale or 1.0 / math.sqrt(c.head_dim)
    bias = torch.zeros(Bx, h, T, T, dtype=torch.float64)
    qu = q.clone()
    if c.relative:
        u, R, b_rel = (p.detach().double() for p in (layer.content_bias, layer.rel_key, layer.rel_bias))
        for b in range(Bx):
            for head in range(h):
                qu[b, head] = q[b, head] + u[head]
                for i in range(T):
                    for j in range(T):
                        delta = i - j
                        if c.relative_buckets is None:
                            r = clipped_row(delta, c.max_relative_position)
                        else:
                            r = t5_bucket(j - i, c.relative_buckets, c.max_relative_position)
                        term = float((q[b, head, i] * R[r, head]).sum()) + float(b_rel[r, head])
                        bias[b, head, i, j] = term * scale
    if rope:
        positions = torch.arange(T)
        qu, k = rope_loop(qu, positions, THETA), rope_loop(k, positions, THETA)
    blocked = torch.zeros(Bx, h, T, T, dtype=torch.bool)
    if causal:
        blocked |= torch.ones(T, T, dtype=torch.bool).triu(1)
    if padding is not None:
        blocked |= padding[:, None, None, :]
    out, weights = naive_attention(qu, k, v, contiguous_groups(h, hk), blocked=blocked, bias=bias, scale=scale)
    o = layer.o_proj
    y = out.transpose(1, 2).reshape(Bx, T, h * c.head_dim) @ o.weight.detach().double().t() + o.bias.detach().double()
    return y, weights


def randomize(layer, seed=1):
    """Random (non-identity, nonzero) RCMHA parameters; projections untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return layer


def rcmha(h=4, **kw):
    torch.manual_seed(0)
    cfg = dict(batch_first=True, max_relative_position=3)
    return RCMHAttention(d * h, h, dtype=torch.float64, **{**cfg, **kw}).eval()


def mha_like(layer):
    c = layer.config
    mha = MultiHeadAttention(c.embed_dim, c.num_heads, num_kv_heads=c.num_kv_heads, rope_theta=c.rope_theta,
                             batch_first=True, dtype=torch.float64).eval()
    mha.load_state_dict({k: v for k, v in layer.state_dict().items() if k.split(".")[0].endswith("_proj")})
    return mha


# -- (c) the convolution ------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("K, T, L", [(3, 7, 0), (3, 7, 2), (4, 2, 3), (4, 1, 1), (1, 5, 0), (2, 6, 1)])
def test_causal_conv_equals_a_loop_over_positions_and_taps(shared, K, T, L):
    h = 3
    x = torch.randn(B, h, T, d, dtype=torch.float64)
    weight = torch.randn(*((d,) if shared else (h, d)), K, dtype=torch.float64)
    bias = torch.randn(*((d,) if shared else (h, d)), dtype=torch.float64)
    prev = torch.randn(B, h, L, d, dtype=torch.float64) if L else None
    out = causal_depthwise_conv(x.transpose(1, 2).contiguous().transpose(1, 2), weight, bias, prev)  # seq-first storage
    torch.testing.assert_close(out, conv_loop(x, weight, bias, prev), atol=1e-12, rtol=1e-12)


def test_conv_tap_order_and_bad_shapes():
    x = torch.arange(5.0).view(1, 1, 5, 1)
    y = causal_depthwise_conv(x, torch.tensor([[1.0, 0.0, 0.0]]))  # the first tap reads two tokens back
    assert y.flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"weight must be .* got \(3, 4, 3\)"):
        causal_depthwise_conv(torch.randn(1, 2, 5, 4), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=r"prev must have shape .* at most kernel-1 = 2"):
        causal_depthwise_conv(torch.randn(1, 2, 5, 4), torch.randn(4, 3), prev=torch.randn(1, 2, 3, 4))


# -- (b) relative logits ------------------------------------------------------------------------
@pytest.mark.parametrize("buckets", [None, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_relative_index_matches_the_row_rules(buckets, causal):
    P, Tq, Tk = 5, 4, 11  # queries at 7..10: offsets beyond P both ways
    index, rows = relative_index(Tq, Tk, max_distance=P, num_buckets=buckets, causal=causal)
    n = 2 * P if buckets is None else buckets
    q, R, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((1, 2, Tq, d), (n, 2, d), (n, 2)))
    out = relative_logits(q, R, b, index, rows=rows, scale=0.5)
    for i in range(Tq):
        for j in range(Tk):
            delta = Tk - Tq + i - j
            if causal and delta < 0:
                assert out[0, :, i, j].isneginf().all()
                continue
            r = clipped_row(delta, P) if buckets is None else t5_bucket(-delta, buckets, P)
            assert int(index[i, j]) + rows.start == r
            for head in range(2):
                expected = (float(q[0, head, i] @ R[r, head]) + float(b[r, head])) * 0.5
                assert abs(float(out[0, head, i, j]) - expected) < 1e-12


@pytest.mark.parametrize("buckets", [None, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_skewed_offset_logits_match_the_row_rules_for_every_block(buckets, causal):
    P, Tq, Tk = 5, 7, 11  # queries at 4..10, in blocks [0, 3) and [3, 7)
    n = 2 * P if buckets is None else buckets
    q, R, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 2, Tq, d), (n, 2, d), (n, 2)))
    rows = offset_rows(Tq, Tk, max_distance=P, num_buckets=buckets, causal=causal)
    keys = offset_keys(R, b, rows, scale=0.5)
    q1 = torch.cat([q, q.new_ones(2, 2, Tq, 1)], dim=-1)
    for s, e in ((0, 3), (3, 7)):
        k_end = Tk - Tq + e if causal else Tk
        width = e - s - 1 + k_end
        buffer = torch.full((2, 2, e - s, width), 7.0, dtype=torch.float64)
        for out in (None, buffer):  # the differentiable path and the one writing into a table
            bias = skew(offset_logits(q1[:, :, s:e], keys, start=Tq - e, width=width, out=out), k_end)
            assert bias.shape == (2, 2, e - s, k_end)
            for i in range(s, e):
                for j in range(k_end):
                    delta = Tk - Tq + i - j
                    if causal and delta < 0:
                        assert bias[:, :, i - s, j].isneginf().all()
                        continue
                    r = clipped_row(delta, P) if buckets is None else t5_bucket(-delta, buckets, P)
                    for head in range(2):
                        expected = (q[:, head, i] @ R[r, head] + b[r, head]) * 0.5
                        torch.testing.assert_close(bias[:, head, i - s, j], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_query_blocks_with_a_per_query_float_mask_equal_one_gathered_bias(causal):
    layer = randomize(rcmha(num_kv_heads=2, max_relative_position=4))
    x = torch.randn(B, 10, layer.embed_dim, dtype=torch.float64)
    attn_mask = torch.randn(10, 10, dtype=torch.float64)
    layer.query_blocks, layer.query_block = 3, 4  # blocks of 3, 4 and 3 queries
    blocked, _ = layer(x, is_causal=causal, attn_mask=attn_mask)
    _, weights = layer(x, is_causal=causal, attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
    assert weights.shape == (B, layer.num_heads, 10, 10)
    layer.query_blocks, layer.query_block = 1, 10  # one block, and the gather path's bias through the layer's mask
    single, _ = layer(x, is_causal=causal, attn_mask=attn_mask)
    torch.testing.assert_close(blocked, single, atol=1e-12, rtol=1e-12)
    q = torch.randn(B, layer.num_heads, 10, d, dtype=torch.float64)
    k, v = torch.randn(B, 2, 10, d, dtype=torch.float64), torch.randn(B, 2, 10, d, dtype=torch.float64)
    mask = AttentionMask(attn_mask[None, None], causal)
    gathered = layer.attend_heads(q, k, v, layer._relative_mask(q, 10, mask), False)[0]
    layer.query_blocks, layer.query_block = 3, 4
    torch.testing.assert_close(layer._relative_attend(q, q, k, v, mask, False)[0], gathered, atol=1e-12, rtol=1e-12)


def test_t5_bucket_reference_matches_known_values():
    # T5's defaults (32 buckets, max_distance 128): distance d < 8 gets bucket d; 128+ the last one
    assert [t5_bucket(-n, 32, 128) for n in (0, 7, 8, 127, 128, 1000)] == [0, 7, 8, 15, 15, 15]
    assert [t5_bucket(n, 32, 128) for n in (1, 7, 1000)] == [17, 23, 31]


@pytest.mark.parametrize("buckets", [None, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_layer_equals_a_loop_over_batch_heads_queries_and_keys(buckets, causal):
    layer = randomize(rcmha(num_kv_heads=2, conv_shared=False, relative_buckets=buckets,
                            max_relative_position=5 if buckets else 3, impl="eager"))
    x = torch.randn(B, 9, layer.embed_dim, dtype=torch.float64)
    padding = torch.zeros(B, 9, dtype=torch.bool)
    padding[1, :2] = True
    expected, expected_w = naive_layer(layer, x, causal=causal, padding=padding)
    out, weights = layer(x, is_causal=causal, key_padding_mask=padding, need_weights=True,
                         average_attn_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(weights, expected_w, atol=1e-12, rtol=1e-12)
    sdpa = RCMHAttention.from_config(layer.config.replace(impl="sdpa"), dtype=torch.float64).eval()
    sdpa.load_state_dict(layer.state_dict())  # the SDPA path computes the same
    torch.testing.assert_close(sdpa(x, is_causal=causal, key_padding_mask=padding)[0], expected, atol=1e-12,
                               rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_queries_after_a_cache_sit_at_their_absolute_positions(causal):
    layer = randomize(rcmha(relative_buckets=8, max_relative_position=5))
    x = torch.randn(B, 9, layer.embed_dim, dtype=torch.float64)
    expected, _ = naive_layer(layer, x, causal=causal)
    cache = KVCache()
    layer(x[:, :5], is_causal=causal, cache=cache)
    out, _ = layer(x[:, 5:], is_causal=causal, cache=cache)  # 4 queries after 5 cached keys
    torch.testing.assert_close(out, expected[:, 5:], atol=1e-12, rtol=1e-12)


def test_rope_rotates_q_plus_u_and_the_relative_term_uses_the_unrotated_query():
    layer = randomize(rcmha(rope_theta=THETA, num_kv_heads=2))
    x = torch.randn(B, 7, layer.embed_dim, dtype=torch.float64)
    expected, _ = naive_layer(layer, x, causal=True, rope=True)
    torch.testing.assert_close(layer(x, is_causal=True)[0], expected, atol=1e-6, rtol=1e-6)  # float32 angles, as HF


# -- (a) the reduction to MHA -------------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    dict(),
    dict(rope_theta=THETA),
    dict(num_kv_heads=2, rope_theta=THETA),
    dict(num_kv_heads=1, conv_shared=False),
    dict(relative_buckets=8, max_relative_position=6, conv_kernel=5),
])
@pytest.mark.parametrize("causal", [True, False])
def test_identity_start_equals_mha(settings, causal):
    layer = rcmha(**settings)
    mha = mha_like(layer)
    x = torch.randn(B, 8, layer.embed_dim, dtype=torch.float64)
    padding = torch.zeros(B, 8, dtype=torch.bool)
    padding[0, -3:] = True
    for kpm in (None, padding):
        torch.testing.assert_close(layer(x, is_causal=causal, key_padding_mask=kpm)[0],
                                   mha(x, is_causal=causal, key_padding_mask=kpm)[0], atol=1e-12, rtol=1e-12)
    randomize(layer)
    assert not torch.allclose(layer(x, is_causal=causal)[0], mha(x, is_causal=causal)[0])


def test_switches_off_is_mha_even_with_the_official_init():
    layer = rcmha(conv=False, relative=False, conv_init="official", num_kv_heads=2)
    assert sorted(layer.state_dict()) == sorted(mha_like(layer).state_dict())
    x = torch.randn(B, 6, layer.embed_dim, dtype=torch.float64)
    assert torch.equal(layer(x, is_causal=True)[0], mha_like(layer)(x, is_causal=True)[0])


@pytest.mark.parametrize("conv, relative, names", [
    (True, False, {"q_conv.weight", "k_conv.bias"}),  # MDHA
    (False, True, {"content_bias", "rel_key", "rel_bias"}),  # RMHA
])
def test_ablation_switches_build_only_their_parameters(conv, relative, names):
    layer = rcmha(conv=conv, relative=relative, conv_init="official")
    extra = {k for k in layer.state_dict() if not k.split(".")[0].endswith("_proj")}
    assert names <= extra and all(("conv" in k) == conv for k in extra)
    other = randomize(rcmha(conv=conv, relative=relative))
    x = torch.randn(B, 6, layer.embed_dim, dtype=torch.float64)
    expected, _ = naive_layer(other, x, causal=True)
    torch.testing.assert_close(other(x, is_causal=True)[0], expected, atol=1e-12, rtol=1e-12)


def test_official_init_is_pytorch_conv_default_and_zero_relative_terms():
    layer = RCMHAttention(256, 4, conv_init="official", conv_kernel=4)
    w = layer.q_conv.weight
    assert w.shape == (64, 4) and 0 < w.abs().max() <= 0.5 and w.std() > 0.2  # U(-1/2, 1/2)
    assert not torch.equal(layer.q_conv.weight, layer.k_conv.weight)
    assert all(not p.detach().any() for p in (layer.content_bias, layer.rel_key, layer.rel_bias))
    ident = RCMHAttention(256, 4, conv_kernel=4)
    assert ident.v_conv.weight[:, :3].abs().max() == 0 and torch.equal(ident.v_conv.weight[:, 3], torch.ones(64))


# -- (d) cached decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    dict(),
    dict(num_kv_heads=2, conv_shared=False, rope_theta=THETA),
    dict(relative_buckets=8, max_relative_position=5, conv_kernel=4),
    dict(conv_kernel=1),
])
def test_cached_decoding_equals_the_full_forward(settings):
    layer = randomize(rcmha(**settings))
    x = torch.randn(B, 11, layer.embed_dim, dtype=torch.float64)
    full, _ = layer(x, is_causal=True)
    cache = KVCache()
    steps = [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=1e-12)
    cache = KVCache()  # chunked prefill (4, then 3), then single tokens
    parts = [layer(x[:, :4], is_causal=True, cache=cache)[0], layer(x[:, 4:7], is_causal=True, cache=cache)[0]]
    parts += [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-12, rtol=1e-12)
    assert cache.seq_len == 11


def test_the_state_refuses_a_cache_of_another_sequence():
    layer = randomize(rcmha())
    cache, other = KVCache(), KVCache()
    layer(torch.randn(1, 8, layer.embed_dim, dtype=torch.float64), is_causal=True, cache=cache)
    other.update(torch.randn(1, 4, 5, d, dtype=torch.float64), torch.randn(1, 4, 5, d, dtype=torch.float64))
    with pytest.raises(headmods.errors.CacheStateError, match="cache holds 5 tokens but its convolution state was "
                       "built on 0"):
        layer(torch.randn(1, 1, layer.embed_dim, dtype=torch.float64), is_causal=True, cache=other)
    cache.reset()  # an empty cache starts a new sequence
    layer(torch.randn(1, 2, layer.embed_dim, dtype=torch.float64), is_causal=True, cache=cache)
    state = cache.layer_states[layer]  # the convolution state lives in the cache, not on the layer
    assert state.tokens == 2 and state.q.size(2) == 2


def test_gpt2_generate_with_cache_equals_without_when_the_new_terms_are_active():
    from .test_swap import V, tiny_gpt2

    model = tiny_gpt2()
    headmods.swap(model, "rcmha", max_relative_position=16)
    for block in model.transformer.h:
        randomize(block.attn, seed=3)
    ids = torch.randint(1, V, (2, 7))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, plain)


# -- (e) gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [dict(), dict(conv_shared=False, num_kv_heads=2, relative_buckets=8,
                                                    max_relative_position=5)])
def test_gradients_reach_every_new_parameter_from_the_identity_start(settings):
    layer = rcmha(**settings).train()
    x = torch.randn(B, 7, layer.embed_dim, dtype=torch.float64)
    out, _ = layer(x, is_causal=True)
    out.square().sum().backward()
    new = {n: p for n, p in layer.named_parameters() if not n.split(".")[0].endswith("_proj")}
    assert set(new) == {"q_conv.weight", "q_conv.bias", "k_conv.weight", "k_conv.bias", "v_conv.weight",
                        "v_conv.bias", "content_bias", "rel_key", "rel_bias"}
    for name, p in new.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# -- (f) bad settings ---------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    (dict(conv_kernel=0), r"conv_kernel must be an int >= 1, got 0"),
    (dict(conv_kernel=2.5), r"conv_kernel must be an int >= 1, got 2.5"),
    (dict(max_relative_position=0), r"max_relative_position must be an int >= 1, got 0"),
    (dict(relative_buckets=7), r"relative_buckets must be None or an even int >= 4 .* got 7"),
    (dict(relative_buckets=2), r"relative_buckets must be None or an even int >= 4 .* got 2"),
    (dict(relative_buckets=True), r"relative_buckets must be None or an even int >= 4 .* got True"),
    (dict(relative_buckets=32, max_relative_position=8), r"max_relative_position \(8\) must exceed "
                                                          r"relative_buckets // 4 \(8\)"),
    (dict(conv_init="random"), r"conv_init must be one of \('identity', 'official'\), got 'random'"),
    (dict(conv="yes"), r"conv must be True or False, got 'yes'"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RCMHAttention(16, 4, **settings)


def test_config_round_trips_and_the_registry_builds_it():
    layer = headmods.create("rcmha", 16, 4, relative_buckets=8, conv_shared=False, conv_init="official")
    c = layer.config
    assert isinstance(c, RCMHAConfig) and RCMHAConfig.from_json(c.to_json()) == c and c.num_relative == 8
    rebuilt = RCMHAttention.from_config(c)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}


# -- (g) from_mha and hosts -------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_from_mha_equals_the_source(causal):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = RCMHAttention.from_mha(mha, max_relative_position=16).eval()
    x = torch.randn(B, 6, 32)
    pad = torch.zeros(B, 6, dtype=torch.bool)
    pad[1, -2:] = True
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1) if causal else None
    ref = mha(x, x, x, key_padding_mask=pad, attn_mask=mask, is_causal=causal, need_weights=False)[0]
    out = layer(x, key_padding_mask=pad, attn_mask=mask, is_causal=causal)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_swap_into_llama_keeps_logits_and_greedy_generate():
    from .test_swap import V, tiny_llama

    model = tiny_llama()
    ids = torch.randint(1, V, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=padding).logits
        ref_gen = model.generate(ids, attention_mask=padding, max_new_tokens=6, do_sample=False, pad_token_id=0)
    report = headmods.swap(model, "rcmha", max_relative_position=32)
    assert report.param_delta > 0 and isinstance(model.model.layers[0].self_attn, RCMHAttention)
    with torch.no_grad():
        out = model(ids, attention_mask=padding).logits
        gen = model.generate(ids, attention_mask=padding, max_new_tokens=6, do_sample=False, pad_token_id=0)
    keep = padding.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


def test_swap_into_bert_and_gpt2_keeps_outputs():
    from .test_swap import V, tiny_bert, tiny_gpt2

    ids = torch.randint(1, V, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, -3:] = 0
    bert = tiny_bert()
    with torch.no_grad():
        ref = bert(ids, attention_mask=padding).last_hidden_state
        headmods.swap(bert, "rcmha", max_relative_position=16)
        out = bert(ids, attention_mask=padding).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gpt2 = tiny_gpt2()
    with torch.no_grad():
        ref, ref_gen = gpt2(ids).logits, gpt2.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        headmods.swap(gpt2, "rcmha", relative_buckets=16, max_relative_position=64)
        torch.testing.assert_close(gpt2(ids).logits, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(gpt2.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), ref_gen)


# -- (h) pruning --------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [[0, 1], [1, 2, 3], [3]])
@pytest.mark.parametrize("shared", [True, False])
def test_pruned_layer_equals_the_layer_with_those_heads_zeroed(keep, shared):
    layer = randomize(rcmha(num_kv_heads=2, conv_shared=shared, relative_buckets=8, max_relative_position=5))
    x = torch.randn(B, 7, layer.embed_dim, dtype=torch.float64)
    zeroed = copy.deepcopy(layer)
    with torch.no_grad():
        for head in set(range(4)) - set(keep):
            zeroed.o_proj.weight[:, head * d:(head + 1) * d] = 0
    pruned = copy.deepcopy(layer).prune_heads(keep)
    c = pruned.config
    assert c.num_heads == len(keep) and pruned.rel_key.shape == (8, len(keep), d)
    assert pruned.content_bias.shape == (len(keep), d) and pruned.rel_bias.shape == (8, len(keep))
    if not shared:
        assert pruned.q_conv.weight.shape == (len(keep), d, 3) and pruned.k_conv.weight.size(0) == c.num_kv_heads
        torch.testing.assert_close(pruned.q_conv.weight, layer.q_conv.weight[keep])
    else:
        assert torch.equal(pruned.k_conv.weight, layer.k_conv.weight)
    torch.testing.assert_close(pruned(x, is_causal=True)[0], zeroed(x, is_causal=True)[0], atol=1e-12, rtol=1e-12)
    cache = KVCache()  # decoding still works after pruning
    steps = [pruned(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), pruned(x, is_causal=True)[0], atol=1e-12, rtol=1e-12)


def test_pruned_swapped_model_saves_and_loads_and_refuses_stock_export(tmp_path):
    from .test_swap import V, tiny_llama

    model = tiny_llama()
    headmods.swap(model, "rcmha", max_relative_position=16, conv_shared=False)
    for layer in model.model.layers:
        randomize(layer.self_attn, seed=5).prune_heads([0, 1])
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    headmods.save(model, tmp_path / "ckpt")
    loaded = headmods.load(tmp_path / "ckpt")
    assert isinstance(loaded.model.layers[0].self_attn, RCMHAttention)
    assert loaded.model.layers[0].self_attn.k_conv.weight.shape == (1, 16, 3)  # kv head 1 went with heads 2, 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'rcmha'; only plain multi-head attention"):
        headmods.export(model, tmp_path / "hf")


def test_segment_memory_as_keys_in_front_equals_the_tail_of_one_long_forward():
    """Transformer-XL memory: [mem; x] as key/value, queries x. Without convolutions this is exactly the
    last rows of a forward over [mem; x] (offsets and the causal mask are end-aligned); with them, only the
    query convolution differs (it sees x alone, as the official code convolves q over the segment)."""
    torch.manual_seed(0)
    mem, x = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    both = torch.cat([mem, x], dim=1)
    for conv in (False, True):
        layer = RCMHAttention(32, 4, batch_first=True, conv=conv, max_relative_position=16, conv_init="official",
                             dtype=torch.float64).eval()
        with torch.no_grad():
            for p in (layer.rel_key, layer.rel_bias, layer.content_bias):
                p.normal_()
            segment = layer(x, both, both, is_causal=True)[0]
            tail = layer(both, is_causal=True)[0][:, 5:]
        if conv:
            assert not torch.allclose(segment, tail)  # the query convolution does not reach into mem
            with torch.no_grad():
                layer.q_conv.reset_parameters("identity")
                segment = layer(x, both, both, is_causal=True)[0]
                tail = layer(both, is_causal=True)[0][:, 5:]
        torch.testing.assert_close(segment, tail, atol=1e-12, rtol=1e-12)
