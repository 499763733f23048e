"""DHA: decoupled kernels vs an expand-and-attend loop, the layer, cache, regrouping, fusion, planning."""

import copy
import math

import pytest
import torch
from torch import nn

import headmods
from headmods import DHAAttention, KVCache
from headmods.convert.dha import (check_budget, collapse, head_similarity, head_weights, input_moments, plan_dha,
                                  plan_gqa, to_dha)
from headmods.convert.dha_fusion import (FusionLagrangian, HeadFusion, attach_fusion, fusion_loss, fusion_parameters,
                                         materialize_fusion)
from headmods.functional import AttentionMask, decoupled_attend
from reference import ShapeRecorder, naive_attention

B, D = 2, 8
MAPS = {  # (h, n_k, n_v, k_map, v_map)
    "perf-doc 25%": (12, 3, 3, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]),
    "unequal groups": (6, 2, 3, [1, 0, 1, 1, 0, 1], [2, 2, 0, 1, 0, 2]),
    "same map, scrambled": (4, 2, 2, [1, 0, 0, 1], [1, 0, 0, 1]),
    "one key head": (5, 1, 4, [0] * 5, [3, 2, 1, 0, 0]),
}


def _expand_reference(q, k, v, k_map, v_map, blocked=None):
    """Expand K and V to one head per query head by an explicit loop, then a per-head attention loop."""
    h = q.size(1)
    k_full = torch.stack([k[:, k_map[i]] for i in range(h)], dim=1)
    v_full = torch.stack([v[:, v_map[i]] for i in range(h)], dim=1)
    return naive_attention(q, k_full, v_full, list(range(h)), blocked=blocked)[0]


def _qkv(h, n_k, n_v, tq, tk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, h, tq, D, generator=g, dtype=torch.float64),
            torch.randn(B, n_k, tk, D, generator=g, dtype=torch.float64),
            torch.randn(B, n_v, tk, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("path", ["grouped", "paired", "eager"])
@pytest.mark.parametrize("tq", [1, 3])
def test_decoupled_attention_equals_expand_and_attend(name, path, tq):
    h, n_k, n_v, k_map, v_map = MAPS[name]
    tk = 11
    q, k, v = _qkv(h, n_k, n_v, tq, tk)
    padding = torch.zeros(B, tk, dtype=torch.bool)
    padding[1, :3] = True  # the second sequence is left-padded
    mask = AttentionMask(bias=torch.zeros(B, 1, 1, tk, dtype=torch.float64).masked_fill(padding[:, None, None], -math.inf),
                         causal=True)
    blocked = torch.zeros(B, h, tq, tk, dtype=torch.bool)
    for t in range(tq):
        blocked[:, :, t, tk - tq + t + 1:] = True  # causal, aligned to the end of the keys
    blocked |= padding[:, None, None, :]
    expected = _expand_reference(q, k, v, k_map, v_map, blocked)
    if path == "paired":
        q = q.requires_grad_()
    impl = "eager" if path == "eager" else "auto"
    out, _ = decoupled_attend(q, k, v, mask, k_map=k_map, v_map=v_map, impl=impl, chunk=4)
    torch.testing.assert_close(out.detach(), expected, atol=1e-12, rtol=1e-12)


def test_grouped_path_gives_zero_rows_without_keys_and_matches_one_chunk():
    h, n_k, n_v, k_map, v_map = MAPS["unequal groups"]
    q, k, v = _qkv(h, n_k, n_v, 1, 9)
    bias = torch.zeros(B, 1, 1, 9, dtype=torch.float64)
    bias[0] = -math.inf  # the first sequence may attend nowhere
    out, _ = decoupled_attend(q, k, v, AttentionMask(bias=bias), k_map=k_map, v_map=v_map, chunk=2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    whole, _ = decoupled_attend(q, k, v, AttentionMask(bias=bias), k_map=k_map, v_map=v_map, chunk=100)
    torch.testing.assert_close(out, whole, atol=1e-13, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_keys_and_values_are_never_expanded_to_query_heads(grad):
    h, n_k, n_v, k_map, v_map = MAPS["perf-doc 25%"]
    tq = 1 if not grad else 5
    q, k, v = (t.float() for t in _qkv(h, n_k, n_v, tq, 40))
    q.requires_grad_(grad)
    with ShapeRecorder() as rec:
        decoupled_attend(q, k, v, AttentionMask(causal=True), k_map=k_map, v_map=v_map, chunk=16)
    assert rec.shapes and (B, h, 40, D) not in rec.shapes and (B, h, D, 40) not in rec.shapes


def _dha(h=6, **kw):
    torch.manual_seed(0)
    cfg = dict(num_kv_heads=2, kv_map=(1, 0, 1, 1, 0, 1), num_v_heads=3, v_map=(2, 2, 0, 1, 0, 2),
               batch_first=True, rope_theta=100.0)
    return DHAAttention(D * h, h, dtype=torch.float64, **{**cfg, **kw}).eval()


def test_layer_equals_an_explicit_loop_over_heads():
    layer = _dha()
    c = layer.config
    x = torch.randn(B, 5, layer.embed_dim, dtype=torch.float64)
    out, _ = layer(x, is_causal=True)
    q = layer.q_proj(x).view(B, 5, 6, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, 5, 2, D).transpose(1, 2)
    v = layer.v_proj(x).view(B, 5, 3, D).transpose(1, 2)
    from reference import rope_loop

    pos = torch.arange(5)
    q, k = rope_loop(q, pos, 100.0), rope_loop(k, pos, 100.0)
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(1).expand(B, 6, 5, 5)
    heads = _expand_reference(q, k, v, c.k_map, c.query_to_value(), blocked)
    expected = layer.o_proj(heads.transpose(1, 2).reshape(B, 5, 6 * D))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # rotary angles are float32, as in HF


def test_cached_decoding_equals_the_full_forward_and_caches_only_fused_heads():
    layer = _dha()
    x = torch.randn(B, 9, layer.embed_dim, dtype=torch.float64)
    full, _ = layer(x, is_causal=True)
    cache = KVCache()
    steps = [layer(x[:, :4], is_causal=True, cache=cache)[0]]
    steps += [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=1e-12)
    assert cache.k.size(1) == 2 and cache.v.size(1) == 3  # n_k key heads and n_v value heads, nothing expanded


def test_from_mha_defaults_equal_the_source_and_config_round_trips():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = DHAAttention.from_mha(mha).eval()
    x = torch.randn(B, 6, 32)
    torch.testing.assert_close(layer(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-6)
    c = _dha().config
    assert type(c).from_json(c.to_json()) == c and c.num_k_heads == 2 and c.kv_fraction() == 5 / 12


def test_regroup_takes_group_means_and_is_exact_when_members_agree():
    layer = _dha(num_kv_heads=6, kv_map=None, num_v_heads=6, v_map=None)
    with torch.no_grad():  # make heads 1 and 4 identical in K, heads 0, 2 and 5 identical in V
        w = layer.k_proj.weight.view(6, D, -1)
        w[4] = w[1]
        layer.k_proj.bias.view(6, D)[4] = layer.k_proj.bias.view(6, D)[1]
        for i in (2, 5):
            layer.v_proj.weight.view(6, D, -1)[i] = layer.v_proj.weight.view(6, D, -1)[0]
            layer.v_proj.bias.view(6, D)[i] = layer.v_proj.bias.view(6, D)[0]
    x = torch.randn(B, 5, layer.embed_dim, dtype=torch.float64)
    before = layer(x, is_causal=True)[0]
    layer.regroup([[0], [1, 4], [2], [3], [5]], [[0, 2, 5], [1], [3], [4]])
    assert layer.config.k_map == (0, 1, 2, 3, 1, 4) and layer.config.query_to_value() == (0, 1, 0, 2, 3, 0)
    assert layer.k_proj.out_features == 5 * D and layer.v_proj.out_features == 4 * D
    torch.testing.assert_close(layer(x, is_causal=True)[0], before, atol=1e-12, rtol=1e-12)
    merged = _dha(num_kv_heads=2, kv_map=None, num_v_heads=2, v_map=None)
    k_rows = merged.k_proj.weight.detach().view(2, D, -1)
    merged.regroup([[0, 1]], [[0], [1]])
    torch.testing.assert_close(merged.k_proj.weight.detach(), (k_rows[0] + k_rows[1]) / 2)


def test_prune_heads_keeps_the_other_heads_function():
    layer = _dha()
    x = torch.randn(B, 5, layer.embed_dim, dtype=torch.float64)
    zeroed = copy.deepcopy(layer)
    with torch.no_grad():
        zeroed.o_proj.weight.view(-1, 6, D)[:, [1, 3]] = 0.0  # heads 1 and 3 contribute nothing
    layer.prune_heads([0, 2, 4, 5])
    c = layer.config
    assert c.num_heads == 4 and c.k_map == (1, 1, 0, 1) and c.query_to_value() == (1, 0, 0, 1)
    torch.testing.assert_close(layer(x, is_causal=True)[0], zeroed(x, is_causal=True)[0], atol=1e-12, rtol=1e-12)


def test_as_mha_reorders_shared_groups_and_refuses_decoupled_ones():
    layer = _dha(h=4, num_kv_heads=2, kv_map=(1, 0, 0, 1), num_v_heads=2, v_map=(1, 0, 0, 1))
    x = torch.randn(B, 5, layer.embed_dim, dtype=torch.float64)
    mha = layer.as_mha()
    assert type(mha) is headmods.MultiHeadAttention and mha.config.kv_map is None
    torch.testing.assert_close(mha(x, is_causal=True)[0], layer(x, is_causal=True)[0], atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="grouped differently"):
        _dha().as_mha()
    with pytest.raises(ValueError, match="unequal sizes"):
        _dha(h=3, num_kv_heads=2, kv_map=(0, 1, 1), num_v_heads=None, v_map=None).as_mha()


def test_bad_maps_and_groups_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"v_map entries must lie in \[0, 3\) \(there are 3 value heads\)"):
        _dha(v_map=(0, 1, 2, 3, 0, 1))
    with pytest.raises(ValueError, match=r"kv_map leaves kv heads \[1\] unused"):
        _dha(kv_map=(0, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="num_v_heads \\(4\\) must divide num_heads"):
        _dha(num_v_heads=4, v_map=None)
    with pytest.raises(ValueError, match="k_groups must split the 2 key heads"):
        _dha().regroup([[0], [0, 1]], [[0, 1, 2]])
    with pytest.raises(ValueError, match="v_groups must split the 3 value heads"):
        _dha().regroup([[0, 1]], [[0, 1]])


# -- conversion -------------------------------------------------------------------------------------

def _encoder(heads=4, layers=2, width=32):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=48, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def test_conversion_before_collapse_equals_the_source_exactly():
    enc = _encoder()
    x = torch.randn(3, 7, 32)
    reference = enc(x)
    layers = to_dha(enc)
    plan = plan_dha(layers, 0.5, moments=input_moments(enc, layers, [x]))
    attach_fusion(layers, plan.groups)
    assert torch.equal(enc(x), reference)  # identity fusion weights: bit-for-bit the source
    assert float(fusion_loss(enc).detach()) > 0


def test_fusion_loss_matches_its_formula_and_training_drives_groups_together():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4 * 3)
    fusion = HeadFusion(linear, [[0, 2], [1], [3]], head_dim=3)
    rows = torch.cat([linear.weight.detach().view(4, -1), linear.bias.detach().view(4, -1)], dim=1)
    pair = sum(float((rows[i] - rows[j]).pow(2).sum()) for i in (0, 2) for j in (0, 2)) / 4
    assert float(fusion.fusion_loss().detach()) == pytest.approx(pair / float(rows.pow(2).sum()), rel=1e-6)
    lagrangian = FusionLagrangian(mu=10.0, dual_lr=1.0)
    opt = torch.optim.Adam(fusion.omegas, lr=0.05)
    start = float(fusion.fusion_loss().detach())
    for _ in range(100):
        loss = fusion.fusion_loss()
        opt.zero_grad()
        lagrangian.penalty(loss).backward()
        opt.step()
        lagrangian.ascend(float(loss.detach()))
    assert float(fusion.fusion_loss().detach()) < 1e-3 * start and lagrangian.lam > 0
    weight, bias = fusion.fused()
    torch.testing.assert_close(weight.view(4, 3, 6)[1], linear.weight.view(4, 3, 6)[1])  # singletons untouched


def test_materialized_fusion_then_collapse_is_lossless_when_groups_agree():
    enc = _encoder()
    x = torch.randn(2, 5, 32)
    layers = to_dha(enc)
    plan = plan_dha(layers, 0.5)
    attach_fusion(layers, plan.groups)
    with torch.no_grad():  # perfect fusion: every row of a group's mixing block is the same average
        for p in fusion_parameters(enc):
            p.fill_(1.0 / p.size(0))
    fused = enc(x)
    assert materialize_fusion(enc) == 4
    collapse(layers, plan)
    torch.testing.assert_close(enc(x), fused, atol=1e-5, rtol=1e-5)
    kept = sum(m.num_kv_heads + m.config.num_v_heads for m in layers.values())
    assert kept == 8 and all(m.config.kv_fraction() >= 1 / 4 for m in layers.values())


def test_cka_from_moments_equals_cka_of_explicit_head_outputs():
    torch.manual_seed(0)
    x = torch.randn(200, 10, dtype=torch.float64) * torch.linspace(0.2, 2.0, 10) + 0.5
    linear = nn.Linear(10, 3 * 4, dtype=torch.float64)
    moment = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    moment = moment.T @ moment / 200
    sim = head_similarity(head_weights(linear, 3, 4), moment)
    outputs = [x @ linear.weight[i * 4:(i + 1) * 4].T.detach() for i in range(3)]
    outputs = [y - y.mean(0) for y in outputs]
    for i in range(3):
        for j in range(3):
            hsic = float((outputs[i].T @ outputs[j]).pow(2).sum())
            norm = math.sqrt(float((outputs[i].T @ outputs[i]).pow(2).sum()) * float((outputs[j].T @ outputs[j]).pow(2).sum()))
            assert float(sim[i, j]) == pytest.approx(hsic / norm, rel=1e-9)


def test_plan_merges_the_near_duplicate_heads_and_meets_the_budget():
    enc = _encoder(heads=4, layers=2)
    with torch.no_grad():  # layer 0: key heads 0 and 2 nearly equal
        w = enc.layers[0].self_attn.in_proj_weight
        w[32 + 16:32 + 24] = w[32:32 + 8] + 1e-4 * torch.randn(8, 32)
    x = torch.randn(4, 6, 32)
    layers = to_dha(enc)
    for linkage in ("similarity", "lsq"):
        plan = plan_dha(layers, 15 / 16, moments=input_moments(enc, layers, [x]), linkage=linkage)
        assert plan.groups["layers.0.self_attn"]["k"] == [[0, 2], [1], [3]], linkage
        assert sum(n for heads in plan.heads().values() for n in heads.values()) == 15
    tight = plan_dha(layers, 0.25)
    assert all(n == 1 for heads in tight.heads().values() for n in heads.values())


def test_gqa_mean_pool_plan_is_contiguous_shared_and_spreads_the_budget():
    layers = to_dha(_encoder(heads=4, layers=3))
    plan = plan_gqa(layers, 0.5)
    assert all(g["k"] == g["v"] == [[0, 1], [2, 3]] for g in plan.groups.values())
    odd = plan_gqa(layers, 5 / 12)  # 5 of 12 kv heads: 2 + 2 + 1
    assert [len(g["k"]) for g in odd.groups.values()] == [2, 2, 1]
    collapse(layers, plan)
    assert all(m.config.is_gqa() for m in layers.values())
    with pytest.raises(ValueError, match="groups keys and values differently"):
        plan_gqa({"x": _dha()}, 0.5)


@pytest.mark.parametrize("budget, message", [
    (0.0, r"budget must be a fraction of the K/V heads in \(0, 1\], got 0.0"),
    (1.5, r"in \(0, 1\], got 1.5"),
    (0.1, r"fewer than one key and one value head per layer \(4 layer sides\); the smallest budget here is 0.25"),
])
def test_budgets_outside_the_range_or_leaving_a_layer_empty_are_refused(budget, message):
    layers = to_dha(_encoder())
    with pytest.raises(ValueError, match=message):
        plan_dha(layers, budget)
    with pytest.raises(ValueError, match=r"budget"):
        check_budget(budget, 16, 4)


def test_plans_and_fusion_refuse_layers_they_do_not_know():
    layers = to_dha(_encoder())
    plan = plan_dha(layers, 0.5)
    with pytest.raises(ValueError, match="not among the DHA layers"):
        attach_fusion({"other": next(iter(layers.values()))}, plan.groups)
    with pytest.raises(ValueError, match="moments has no entry"):
        plan_dha(layers, 0.5, moments={})
    with pytest.raises(ValueError, match="no DHA layers"):
        headmods.convert.dha.dha_layers(nn.Linear(2, 2))


def test_consensus_blend_makes_group_heads_equal_and_is_off_at_zero():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4 * 3)
    fusion = HeadFusion(linear, [[0, 2, 3], [1]], head_dim=3)
    x = torch.randn(5, 6)
    torch.testing.assert_close(fusion(x), linear(x))  # identity weights, no blend
    from headmods.convert.dha_fusion import set_consensus

    set_consensus(fusion, 1.0)
    weight, bias = fusion.fused()
    rows = weight.view(4, 3, 6)
    mean = linear.weight.view(4, 3, 6)[[0, 2, 3]].mean(0)
    for i in (0, 2, 3):
        torch.testing.assert_close(rows[i], mean)
    torch.testing.assert_close(rows[1], linear.weight.view(4, 3, 6)[1])
    assert float(fusion.fusion_loss().detach()) < 1e-12
    with pytest.raises(ValueError, match=r"consensus must lie in \[0, 1\], got 1.5"):
        set_consensus(fusion, 1.5)
