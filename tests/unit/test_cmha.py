"""CMHA: the separable layer against the official per-pair formula, the RoPE reduction, cache, gradients,
GQA and pruning, bad input, hosts and checkpoints."""

import copy
import math

import pytest
import torch
from torch import nn

import headmods
from headmods import CMHAConfig, CMHAttention, KVCache, MultiHeadAttention
from headmods.functional import AttentionMask
from headmods.functional.complex_phase import complex_phase, polar_pairs

B, D = 2, 8  # batch, head_dim
THETA = 100.0
EPS = 1e-9


# -- independent references (explicit loops, float64) -----------------------------------------------

def _polar(vec):
    """A head vector (list of d floats) as d/2 (rho, theta) pairs, pairing j with j + d/2."""
    half = len(vec) // 2
    return [(math.sqrt(vec[j] ** 2 + vec[j + half] ** 2 + EPS), math.atan2(vec[j + half], vec[j])) for j in range(half)]


def per_pair_attention(q, k, v, delta, beta, q_pos, k_pos, kv_of_head, *, theta=THETA, scale=None):
    """CMHA as the paper writes it, one (batch, head, query m, key n, frequency j) at a time.

    q (B, h, Tq, d), k and v (B, h_kv, Tk, d): projections, never rotated. delta, beta (h, d/2) per
    query head. Key n is visible to query m when k_pos[n] <= q_pos[m] (causal by absolute position).
        s = scale * sum_j rho_q rho_k cos(delta_j (theta_q - theta_k) + beta_j + (m - n) omega_j)
    Returns the per-head outputs (B, h, Tq, d) and the attention weights (B, h, Tq, Tk).
    """
    q, k, v = q.tolist(), k.tolist(), v.tolist()
    delta, beta = delta.tolist(), beta.tolist()
    nb, h, tq, d = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    tk, half = len(k[0][0]), d // 2
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    omega = [theta ** (-2.0 * j / d) for j in range(half)]
    out = torch.zeros(nb, h, tq, d, dtype=torch.float64)
    weights = torch.zeros(nb, h, tq, tk, dtype=torch.float64)
    for b in range(nb):
        for i in range(h):
            g = kv_of_head[i]
            keys = [_polar(k[b][g][n]) for n in range(tk)]
            for m in range(tq):
                pq = _polar(q[b][i][m])
                scores = []
                for n in range(tk):
                    if k_pos[n] > q_pos[m]:
                        scores.append(None)
                        continue
                    s = 0.0
                    for j in range(half):
                        (rq, tq_j), (rk, tk_j) = pq[j], keys[n][j]
                        phase = delta[i][j] * (tq_j - tk_j) + beta[i][j] + (q_pos[m] - k_pos[n]) * omega[j]
                        s += rq * rk * math.cos(phase)
                    scores.append(s * scale)
                top = max(s for s in scores if s is not None)
                exps = [0.0 if s is None else math.exp(s - top) for s in scores]
                total = sum(exps)
                for n in range(tk):
                    weights[b, i, m, n] = exps[n] / total
                    for c in range(d):
                        out[b, i, m, c] += exps[n] / total * v[b][g][n][c]
    return out, weights


def rope_tables(positions, d, theta=THETA):
    """HF rotate-half (cos, sin), (1, T, d), computed in float64 with math.cos / math.sin."""
    cos = torch.zeros(1, len(positions), d, dtype=torch.float64)
    sin = torch.zeros(1, len(positions), d, dtype=torch.float64)
    for t, pos in enumerate(positions):
        for j in range(d // 2):
            angle = pos * theta ** (-2.0 * j / d)
            cos[0, t, j] = cos[0, t, j + d // 2] = math.cos(angle)
            sin[0, t, j] = sin[0, t, j + d // 2] = math.sin(angle)
    return cos, sin


def rephased_keys_loop(k, delta, positions, theta=THETA):
    """What the cache must hold, by explicit loops: rho [cos, sin](delta theta + n omega) per pair of k."""
    nb, hk, t_len, d = k.shape
    out = torch.zeros(nb, hk, t_len, d, dtype=torch.float64)
    for b in range(nb):
        for g in range(hk):
            for t, pos in enumerate(positions):
                for j, (rho, ang) in enumerate(_polar(k[b, g, t].tolist())):
                    phi = float(delta[g, j]) * ang + pos * theta ** (-2.0 * j / d)
                    out[b, g, t, j], out[b, g, t, j + d // 2] = rho * math.cos(phi), rho * math.sin(phi)
    return out


# -- layers -------------------------------------------------------------------------------------------

HEADS = {  # name: (num_heads, num_kv_heads, kv_map)
    "mha": (4, 4, None),
    "gqa": (4, 2, None),
    "scrambled kv_map": (4, 2, (1, 0, 0, 1)),
}


def _cmha(h=4, h_kv=4, kv_map=None, randomize=True, **kw):
    torch.manual_seed(0)
    cfg = dict(num_kv_heads=h_kv, kv_map=kv_map, batch_first=True, rope_theta=THETA, dtype=torch.float64)
    layer = CMHAttention(D * h, h, **{**cfg, **kw}).eval()
    if randomize:
        with torch.no_grad():
            layer.delta.normal_(0.0, 1.0)
            layer.beta.uniform_(-math.pi, math.pi)
            layer.q_proj.bias.normal_()
            layer.k_proj.bias.normal_()
    return layer


def _heads(layer, x):
    """Un-rotated projections (B, h|h_kv, T, d) and the per-query-head delta, beta, read from the parameters."""
    c = layer.config
    T = x.size(1)
    q = layer.q_proj(x).view(B, T, c.num_heads, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, c.num_kv_heads, D).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, c.num_kv_heads, D).transpose(1, 2)
    group = c.num_heads // c.num_kv_heads
    to_kv = list(c.kv_map) if c.kv_map is not None else [i // group for i in range(c.num_heads)]
    delta = torch.stack([layer.delta[to_kv[i]] for i in range(c.num_heads)])
    return q.detach(), k.detach(), v.detach(), delta.detach(), layer.beta.detach(), to_kv


def _output(layer, heads):
    c = layer.config
    return layer.o_proj(heads.transpose(1, 2).reshape(heads.size(0), heads.size(2), c.num_heads * D))


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("scale", [None, 1.0], ids=["1/sqrt(d)", "official unscaled"])
def test_separable_layer_equals_the_per_pair_formula(name, scale):
    h, h_kv, kv_map = HEADS[name]
    layer = _cmha(h, h_kv, kv_map, scale=scale)
    T = 12
    x = torch.randn(B, T, D * h, dtype=torch.float64)
    q, k, v, delta, beta, to_kv = _heads(layer, x)
    pos = list(range(T))
    heads, weights = per_pair_attention(q, k, v, delta, beta, pos, pos, to_kv, scale=scale)
    with torch.no_grad():
        out, got_weights = layer.core(x, x, x, AttentionMask(causal=True), rope=rope_tables(pos, D), need_weights=True)
        torch.testing.assert_close(out, _output(layer, heads), atol=1e-9, rtol=0)
        torch.testing.assert_close(got_weights, weights, atol=1e-9, rtol=0)
        sdpa, _ = layer.core(x, x, x, AttentionMask(causal=True), rope=rope_tables(pos, D))  # the SDPA path
        torch.testing.assert_close(sdpa, _output(layer, heads), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["mha", "scrambled kv_map"])
def test_separable_layer_equals_the_per_pair_formula_after_a_cache_offset(name):
    h, h_kv, kv_map = HEADS[name]
    layer = _cmha(h, h_kv, kv_map)
    T, past = 12, 5
    x = torch.randn(B, T, D * h, dtype=torch.float64)
    q, k, v, delta, beta, to_kv = _heads(layer, x)
    heads, _ = per_pair_attention(q[:, :, past:], k, v, delta, beta, list(range(past, T)), list(range(T)), to_kv)
    cache = KVCache()
    with torch.no_grad():
        layer.core(x[:, :past], x[:, :past], x[:, :past], AttentionMask(causal=True), rope=rope_tables(range(past), D),
                   cache=cache)
        out, _ = layer.core(x[:, past:], x[:, past:], x[:, past:], AttentionMask(causal=True),
                            rope=rope_tables(range(past, T), D), cache=cache)
    torch.testing.assert_close(out, _output(layer, heads), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", list(HEADS))
def test_rope_start_equals_rope_attention(name):
    h, h_kv, kv_map = HEADS[name]
    layer = _cmha(h, h_kv, kv_map, randomize=False)
    assert torch.equal(layer.delta, torch.ones(h_kv, D // 2)) and torch.equal(layer.beta, torch.zeros(h, D // 2))
    mha = MultiHeadAttention(D * h, h, num_kv_heads=h_kv, kv_map=kv_map, batch_first=True, rope_theta=THETA,
                             dtype=torch.float64).eval()
    mha.load_state_dict({n: p for n, p in layer.state_dict().items() if n not in ("delta", "beta")})
    x = torch.randn(B, 10, D * h, dtype=torch.float64)
    padding = torch.zeros(B, 10, dtype=torch.bool)
    padding[1, :3] = True
    kw = dict(is_causal=True, key_padding_mask=padding)
    with torch.no_grad():
        ours, ref = layer(x, **kw)[0], mha(x, **kw)[0]
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)  # the only difference is the 1e-9 under sqrt
        layer.beta.fill_(0.1)  # the test can tell the layers apart
        assert (layer(x, **kw)[0] - ref).abs().max() > 1e-3


def test_cached_decoding_equals_the_full_forward_and_caches_rephased_roped_keys():
    layer = _cmha(4, 2, phase_init="paper")
    x = torch.randn(B, 9, 4 * D, dtype=torch.float64)
    with torch.no_grad():
        full, _ = layer(x, is_causal=True)
        cache = KVCache()
        steps = [layer(x[:, :4], is_causal=True, cache=cache)[0]]
        steps += [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=0)
    _, k, _, _, _, _ = _heads(layer, x)
    expected = rephased_keys_loop(k, layer.delta.detach(), range(9))
    assert cache.k.size(1) == 2  # kv heads only, never expanded to the 4 query heads
    torch.testing.assert_close(cache.k[:, :, :9], expected, atol=1e-6, rtol=0)  # RoPE angles are float32, as in HF


def test_the_causal_mask_is_applied_unlike_the_official_lm_path():
    layer = _cmha()
    x = torch.randn(B, 8, 4 * D, dtype=torch.float64)
    changed = x.clone()
    changed[:, 5:] = torch.randn(B, 3, 4 * D, dtype=torch.float64)
    with torch.no_grad():
        a, b = layer(x, is_causal=True)[0], layer(changed, is_causal=True)[0]
        torch.testing.assert_close(a[:, :5], b[:, :5], atol=0, rtol=0)  # the past never sees the future
        assert (layer(x)[0][:, :5] - layer(changed)[0][:, :5]).abs().max() > 1e-3  # without is_causal it would


# -- gradients ------------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter_and_are_finite_with_an_all_zero_head():
    layer = _cmha(4, 2, phase_init="paper").train()
    with torch.no_grad():  # kv head 1 and query head 3 have exactly zero projections: every pair is 0
        layer.k_proj.weight[D:2 * D] = 0.0
        layer.k_proj.bias[D:2 * D] = 0.0
        layer.q_proj.weight[3 * D:] = 0.0
        layer.q_proj.bias[3 * D:] = 0.0
    x = torch.randn(B, 7, 4 * D, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x, is_causal=True)
    out.square().sum().backward()
    for name, p in [("input", x), *layer.named_parameters()]:
        grad = p.grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    assert layer.beta.grad[0].abs().sum() > 0 and layer.delta.grad[0].abs().sum() > 0


def test_the_guard_bounds_gradients_of_tiny_and_zero_pairs_that_plain_atan2_blows_up():
    x = torch.zeros(1, 2, 3, D, dtype=torch.float64)
    x[0, 0] = torch.randn(3, D, dtype=torch.float64)  # head 0 random
    x[0, 1, 0, 0] = 1e-12  # head 1: one tiny pair (a = 1e-12, b = 0), every other pair exactly zero
    delta = torch.full((2, D // 2), 0.7, dtype=torch.float64, requires_grad=True)
    beta = torch.full((2, D // 2), 0.3, dtype=torch.float64, requires_grad=True)

    def official(x):  # the official transform with plain atan2
        a, b = x[..., :D // 2], x[..., D // 2:]
        rho, phi = (a * a + b * b + EPS).sqrt(), torch.atan2(b, a) * delta[:, None] + beta[:, None]
        return torch.cat([rho * phi.cos(), rho * phi.sin()], dim=-1)

    plain = x.clone().requires_grad_()
    official(plain).sum().backward()
    assert plain.grad[0, 1].abs().max() > 1e6  # the failure the guard exists for
    guarded = x.clone().requires_grad_()
    out = complex_phase(guarded, delta, beta)
    torch.testing.assert_close(out, official(x), atol=1e-15, rtol=0)  # same values
    out.sum().backward()
    assert torch.isfinite(guarded.grad).all() and guarded.grad.abs().max() <= 2 * (1 + 0.7)
    assert torch.isfinite(delta.grad).all() and torch.isfinite(beta.grad).all()
    torch.testing.assert_close(guarded.grad[0, 0], plain.grad[0, 0], atol=1e-6, rtol=1e-6)  # ordinary pairs: exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_pairs_stay_finite_in_half_precision(dtype):
    x = torch.zeros(1, 2, 3, D, dtype=dtype)
    x[0, 0] = torch.randn(3, D).to(dtype)  # head 1 exactly zero: float16 alone would round eps = 1e-9 to 0
    x.requires_grad_()
    delta = torch.ones(2, D // 2, dtype=dtype, requires_grad=True)
    out = complex_phase(x, delta, torch.zeros(2, D // 2, dtype=dtype))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(delta.grad).all()
    torch.testing.assert_close(out[0, 0].float(), x[0, 0].detach().float(), atol=0.05, rtol=0.02)


def test_guarded_gradient_matches_finite_differences_and_keeps_the_value():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, D, dtype=torch.float64, generator=g).requires_grad_()
    delta = torch.randn(3, D // 2, dtype=torch.float64, generator=g).requires_grad_()
    beta = torch.randn(3, D // 2, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(complex_phase, (x, delta, beta), eps=1e-6, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        plain = complex_phase(x, delta, beta)
    assert torch.equal(complex_phase(x, delta, beta).detach(), plain)  # the guard changes no value


def test_polar_pairs_against_math():
    x = torch.randn(3, D, dtype=torch.float64)
    rho, theta = polar_pairs(x)
    for t in range(3):
        for j, (r, ang) in enumerate(_polar(x[t].tolist())):
            assert abs(rho[t, j].item() - r) < 1e-15 and abs(theta[t, j].item() - ang) < 1e-15


# -- structure ------------------------------------------------------------------------------------------

def test_prune_heads_equals_zeroing_their_outputs_and_slices_delta_and_beta():
    layer = _cmha(6, 2)
    x = torch.randn(B, 6, 6 * D, dtype=torch.float64)
    zeroed = copy.deepcopy(layer)
    with torch.no_grad():
        zeroed.o_proj.weight.view(-1, 6, D)[:, [1, 2, 5]] = 0.0
    delta, beta = layer.delta.detach().clone(), layer.beta.detach().clone()
    layer.prune_heads([0, 3, 4])  # kv groups become unequal: head 0 reads kv 0, heads 3 and 4 read kv 1
    c = layer.config
    assert (c.num_heads, c.num_kv_heads, c.kv_map) == (3, 2, (0, 1, 1))
    assert torch.equal(layer.beta, beta[[0, 3, 4]]) and torch.equal(layer.delta, delta)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, is_causal=True)[0], zeroed(x, is_causal=True)[0], atol=1e-12, rtol=0)
    layer.prune_heads([1, 2])  # only kv head 1 is still read
    assert tuple(layer.delta.shape) == (1, D // 2) and torch.equal(layer.delta, delta[[1]])
    assert layer.config.kept_heads == (3, 4) and layer.delta.requires_grad


def test_registry_config_round_trip_and_phase_inits():
    layer = headmods.create("cmha", 32, 4, num_kv_heads=2, phase_init="paper", rope_theta=500.0)
    assert type(layer) is CMHAttention and headmods.get_variant("cmha") is CMHAttention
    c = layer.config
    assert CMHAConfig.from_json(c.to_json()) == c and c.phase_init == "paper"
    assert CMHAttention(32, 4).config.rope_theta == 10000.0  # the official fixed base by default
    wide = CMHAttention(512, 4, phase_init="paper")  # delta (4, 64) ~ N(0, std = 1/sqrt(64))
    assert abs(wide.delta.detach().std().item() / 0.125 - 1) < 0.2 and wide.beta.abs().sum() == 0
    rebuilt = CMHAttention.from_config(c)
    assert rebuilt.config == c and rebuilt.delta.shape == (2, 4)


# -- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(embed_dim=30, num_heads=2), r"head_dim must be even; got head_dim=15 \(embed_dim=30, num_heads=2\)"),
    (dict(embed_dim=32, num_heads=4, head_dim=7), r"head_dim must be even; got head_dim=7"),
    (dict(embed_dim=32, num_heads=4, phase_init="xavier"),
     r"phase_init must be one of \('rope', 'paper'\), got 'xavier'"),
    (dict(embed_dim=32, num_heads=4, rope_theta=None),
     r"CMHA needs rotary position frequencies .* got rope_theta=None"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        CMHAttention(settings.pop("embed_dim"), settings.pop("num_heads"), **settings)


def test_missing_rope_and_bad_shapes_are_refused():
    layer = _cmha()
    x = torch.randn(B, 3, 4 * D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"CMHA needs rotary positions: the core got rope=None"):
        layer.core(x, x, x, AttentionMask(causal=True))
    with pytest.raises(ValueError, match=r"delta must have shape \(heads, head_dim // 2\) = \(4, 4\) .* got \(2, 4\)"):
        complex_phase(torch.randn(1, 4, 3, D), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"even last dimension \(head_dim\), got 7"):
        polar_pairs(torch.randn(3, 7))


# -- hosts and checkpoints -------------------------------------------------------------------------------

def test_from_mha_at_the_rope_start_equals_the_source():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = CMHAttention.from_mha(mha, rope_theta=THETA).eval()
    roped = MultiHeadAttention.from_mha(mha, rope_theta=THETA).eval()
    x = torch.randn(B, 6, 32)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
        at_zero = layer(x, positions=torch.zeros(6, dtype=torch.long))[0]  # position 0: RoPE is the identity
        torch.testing.assert_close(at_zero, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer(x, is_causal=True)[0], roped(x, is_causal=True)[0], atol=1e-5, rtol=0)
        assert (layer(x, is_causal=True)[0] - ref).abs().max() > 1e-3  # positions do change it


def test_swap_into_llama_keeps_logits_and_greedy_generation():
    from .test_swap import V, tiny_llama

    model = tiny_llama()
    ids = torch.randint(1, V, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(ids, attention_mask=padding).logits
        ref_gen = model.generate(ids, attention_mask=padding, max_new_tokens=8, do_sample=False, pad_token_id=0)
    report = headmods.swap(model, "cmha")
    layer = model.model.layers[0].self_attn
    assert isinstance(layer, CMHAttention) and layer.config.rope_theta == 500.0  # the host's base, recorded
    assert report.param_delta == 2 * (2 * 8 + 4 * 8)  # per layer: delta (h_kv, d/2) + beta (h, d/2)
    keep = padding.bool()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=padding).logits[keep], ref[keep], atol=1e-5, rtol=0)
        gen = model.generate(ids, attention_mask=padding, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref_gen)


def test_llama_with_learned_phases_decodes_with_the_cache_as_in_one_pass():
    from transformers import DynamicCache

    from .test_swap import V, tiny_llama

    model = tiny_llama()
    headmods.swap(model, "cmha", phase_init="paper")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.beta.uniform_(-1.0, 1.0)
    ids = torch.randint(1, V, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :4], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_swap_refuses_hosts_without_rotary_positions():
    from .test_swap import tiny_bert, tiny_llama

    with pytest.raises(ValueError, match="CMHA needs rotary positions, and BertAttention gets none from its model"):
        headmods.swap(tiny_bert(), "cmha")
    own = r"uses the model's own rotary embeddings \(rope_theta=500.0\); got rope_theta=1000"
    with pytest.raises(ValueError, match=own):
        headmods.swap(tiny_llama(), "cmha", rope_theta=1000.0)


def test_save_and_load_round_trip(tmp_path):
    from .test_swap import V, tiny_llama

    model = tiny_llama()
    headmods.swap(model, "cmha", phase_init="paper")
    with torch.no_grad():
        model.model.layers[1].self_attn.beta.uniform_(-1.0, 1.0)
    model.model.layers[1].self_attn.prune_heads([0, 3])
    headmods.save(model, tmp_path / "ckpt")
    loaded = headmods.load(tmp_path / "ckpt")
    ids = torch.randint(1, V, (1, 7))
    attn = loaded.model.layers[1].self_attn
    assert isinstance(attn, CMHAttention) and attn.config == model.model.layers[1].self_attn.config
    assert torch.equal(attn.beta, model.model.layers[1].self_attn.beta) and attn.delta.shape == (2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)

    native = nn.Sequential(CMHAttention(16, 4, batch_first=True, phase_init="paper")).eval()
    headmods.save(native, tmp_path / "native")
    skeleton = nn.Sequential(CMHAttention(16, 4, batch_first=True))
    back = headmods.load(tmp_path / "native", model=skeleton)
    x = torch.randn(1, 5, 16)
    assert torch.equal(back[0].delta, native[0].delta)
    torch.testing.assert_close(back[0](x, is_causal=True)[0], native[0](x, is_causal=True)[0], atol=0, rtol=0)
