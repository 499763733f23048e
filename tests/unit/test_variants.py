"""One suite for every registered variant (timm's pattern): registering a variant gives it every test here.

Each test is parametrized over ``headmods.list_variants()``. What a variant needs to run comes from
``test_layer_safety.SETTINGS`` (shared, not duplicated); what it supports (GQA, returned weights,
masks, pruning, its documented start from ``nn.MultiheadAttention``) is the ``TRAITS`` table below,
and the tests assert the behaviour each entry names, so a wrong entry fails rather than skips.
Interleaved-cache decoding, half precision and copies are in ``test_layer_safety.py`` and not
repeated here.

References are independent of the code under test: torch's own modules, explicit loops from
``tests/reference.py``, or a copy of the layer with ``o_proj`` columns zeroed by hand.
Everything runs in float64 on tiny shapes (embed 32, 4 heads) except the ``from_mha`` checks,
which compare float32 layers to ``nn.MultiheadAttention`` at 1e-5.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import headmods
from headmods import KVCache
from reference import rope_loop

from .test_layer_safety import SETTINGS, THETA

E, H = 32, 4
D = E // H
F64 = torch.float64
VARIANTS = headmods.list_variants()


@dataclass(frozen=True)
class Traits:
    """What a variant supports, as its module docstring documents it.

    kv_heads: kv heads the suite builds it with (2 = GQA; SHRP requires one kv head per head).
    weights: ``need_weights=True`` returns weights (else a ValueError naming it).
    masks: ``key_padding_mask`` / ``attn_mask`` accepted (LongHeads: causal, unpadded only).
    causal_only: the layer must be called with ``is_causal=True``.
    keep: heads ``prune_heads`` keeps in the prune and save/load tests (None: it cannot prune).
    prune_ref: ``"zeroed"``: the pruned layer equals the original with the dropped heads' ``o_proj``
        columns zeroed; ``"routed"``: the same, on tokens whose routing chose no dropped head
        (routing re-picks among kept heads elsewhere, as MoH and SHRP document).
    start: the documented start of ``from_mha``: ``"mha"`` (equals ``nn.MultiheadAttention``),
        ``"rope"`` (equals the same weights with RoPE on q and k), ``"one_head"`` (SHRP: each
        token's argmax-routed head's MHA term plus the output bias).
    from_mha: settings that give that start.
    """

    kv_heads: int = 2
    weights: bool = True
    masks: bool = True
    causal_only: bool = False
    keep: tuple[int, ...] | None = (0, 1, 3)
    prune_ref: str = "zeroed"
    start: str = "mha"
    from_mha: dict = field(default_factory=dict)


TRAITS = {
    "mha": Traits(),
    "dha": Traits(),  # from_mha with the defaults: every head its own key and value group
    # K = h - h_s active heads with zero routers is exactly MHA
    "moh": Traits(prune_ref="routed", from_mha={"active_routed": 2, "router_init": "zero"}),
    "shrp": Traits(kv_heads=4, prune_ref="routed", start="one_head"),
    "cmha": Traits(start="rope", from_mha={"rope_theta": THETA}),  # delta = 1, beta = 0
    "rcmha": Traits(),  # conv_init="identity", u = R = b = 0
    # within its budget (T <= attend_length) LongHeads is full causal RoPE attention; prune whole kv groups
    "longheads": Traits(weights=False, masks=False, causal_only=True, keep=(2, 3), start="rope",
                        from_mha=dict(SETTINGS["longheads"])),
}


def test_every_registered_variant_has_settings_and_traits():
    assert sorted(SETTINGS) == VARIANTS, "add the new variant to test_layer_safety.SETTINGS"
    assert sorted(TRAITS) == VARIANTS, "add the new variant to test_variants.TRAITS"


def _layer(name, *, seed=0, perturb=True, dtype=F64, **over):
    """A float64 batch-first layer, parameters moved off the variant's start so mistakes show."""
    torch.manual_seed(seed)
    settings = {"num_kv_heads": TRAITS[name].kv_heads, "batch_first": True, **SETTINGS[name], **over}
    layer = headmods.create(name, E, H, dtype=dtype, **settings).eval()
    if perturb:
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return layer


def _causal(name):
    return TRAITS[name].causal_only


def _x(*shape, dtype=F64):
    return torch.randn(*shape, E, dtype=dtype)


def _twin(layer, **changes):
    """A layer of the same variant built from ``layer``'s config (with ``changes``) and its weights."""
    twin = type(layer).from_config(layer.config.replace(**changes), dtype=F64)
    twin.load_state_dict(layer.state_dict())
    return twin.eval()


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# -- construction and config ---------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_create_from_config_and_json_round_trip(name):
    layer = _layer(name)
    assert isinstance(layer, headmods.get_variant(name)) and type(layer).variant == name
    c = layer.config
    assert (c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim) == (E, H, TRAITS[name].kv_heads, D)
    assert type(c) is type(layer).config_class
    assert type(c).from_dict(c.to_dict()) == c
    assert type(c).from_json(c.to_json()) == c
    rebuilt = type(layer).from_config(type(c).from_json(c.to_json()), dtype=F64).eval()
    assert rebuilt.config == c
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    rebuilt.load_state_dict(layer.state_dict())
    x = _x(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, is_causal=_causal(name))[0], layer(x, is_causal=_causal(name))[0],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_gqa_is_accepted_or_refused_clearly(name):
    if TRAITS[name].kv_heads == H:  # SHRP: a token's one head needs its own keys and values
        with pytest.raises(ValueError, match=r"num_kv_heads \(2\) must equal num_heads \(4\)"):
            headmods.create(name, E, H, num_kv_heads=2, **SETTINGS[name])
    else:
        layer = headmods.create(name, E, H, num_kv_heads=2, **SETTINGS[name])
        assert layer.k_proj.out_features == 2 * D


# -- layouts and returned weights ----------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_layouts_agree(name):
    """batch_first=True, seq-first and unbatched inputs compute the same thing."""
    layer = _layer(name)
    seq_first = _twin(layer, batch_first=False)
    causal = _causal(name)
    x = _x(2, 6)
    with torch.no_grad():
        out = layer(x, is_causal=causal)[0]
        out_sf = seq_first(x.transpose(0, 1).contiguous(), is_causal=causal)[0]
        out_1 = layer(x[1], is_causal=causal)[0]
        out_1_sf = seq_first(x[1], is_causal=causal)[0]
    assert out.shape == (2, 6, E) and out_sf.shape == (6, 2, E) and out_1.shape == out_1_sf.shape == (6, E)
    torch.testing.assert_close(out_sf.transpose(0, 1), out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out_1, out[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out_1_sf, out[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("name", VARIANTS)
def test_need_weights(name, batch_first):
    layer = _layer(name) if batch_first else _twin(_layer(name), batch_first=False)
    causal = _causal(name)
    B, T = 2, 6
    x = _x(B, T) if batch_first else _x(T, B)
    if not TRAITS[name].weights:
        for xi in (x, x[:, 0]):
            with pytest.raises(ValueError, match="no attention weights"):
                layer(xi, need_weights=True, is_causal=causal)
        return
    with torch.no_grad():
        plain, none = layer(x, is_causal=True)
        out, avg = layer(x, need_weights=True, is_causal=True)
        out_h, per_head = layer(x, need_weights=True, average_attn_weights=False, is_causal=True)
        _, unbatched = layer(x[:, 0] if not batch_first else x[0], need_weights=True, is_causal=True)
        _, unbatched_h = layer(x[:, 0] if not batch_first else x[0], need_weights=True, average_attn_weights=False,
                               is_causal=True)
    assert none is None
    assert avg.shape == (B, T, T) and per_head.shape == (B, H, T, T)
    assert unbatched.shape == (T, T) and unbatched_h.shape == (H, T, T)
    # the path that returns weights (dense) computes the same output as the default one (sparse for routed heads)
    torch.testing.assert_close(out, plain, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_h, plain, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(per_head.mean(1), avg, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(per_head.sum(-1), torch.ones(B, H, T, dtype=F64), atol=1e-12, rtol=1e-12)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert (per_head[..., future] == 0).all()
    torch.testing.assert_close(unbatched_h, per_head[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", VARIANTS)
def test_eager_kernel_equals_the_default(name):
    """``impl="eager"`` (the explicit softmax path) computes what ``impl="auto"`` (SDPA) does."""
    layer = _layer(name)
    eager = _twin(layer, impl="eager")
    x = _x(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(eager(x, is_causal=True)[0], layer(x, is_causal=True)[0], atol=1e-9, rtol=1e-9)
        if TRAITS[name].masks:
            pad = torch.zeros(2, 20, dtype=torch.bool)
            pad[1, 15:] = True
            torch.testing.assert_close(eager(x, key_padding_mask=pad)[0], layer(x, key_padding_mask=pad)[0],
                                       atol=1e-9, rtol=1e-9)


# -- backward --------------------------------------------------------------------------------------
# Parameters that may legitimately get no gradient in one training forward: none. Routed heads
# (MoH, SHRP) are computed densely in training, so a head no token chose still gets a (zero, finite)
# gradient on its rows, and each parameter tensor spans several heads; MoH's W_r gets its gradient
# through the gates and the load-balance aux_loss.
NO_GRADIENT: dict[str, set[str]] = {name: set() for name in TRAITS}


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_reaches_every_parameter(name):
    layer = _layer(name).train()
    x = _x(2, 20).requires_grad_()
    out, _ = layer(x, is_causal=True)
    loss = out.square().mean()
    if layer.aux_loss is not None:
        assert layer.aux_loss.requires_grad
        loss = loss + layer.aux_loss
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for n, p in layer.named_parameters():
        if n in NO_GRADIENT[name]:
            continue
        assert p.grad is not None, f"{name}: {n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {n} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {n} got an all-zero gradient"
    # dropout is 0: the training path (dense for routed heads) computes what eval computes
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x, is_causal=True)[0], out.detach(), atol=1e-9, rtol=1e-9)


# -- dropout ---------------------------------------------------------------------------------------
NO_DROPOUT = {"longheads"}  # refuses dropout > 0 at construction (a training-free inference method)


def _dropout_params():
    for name in VARIANTS:
        for mode in ("grad", "no_grad"):
            yield pytest.param(name, mode, id=f"{name}-{mode}")


@pytest.mark.parametrize("name, mode", list(_dropout_params()))
def test_dropout_applies_in_training_only(name, mode):
    """``dropout`` (AttentionConfig: on attention probabilities, training only) is a no-op in eval and
    changes a training forward, with or without autograd."""
    layer = _layer(name)
    if name in NO_DROPOUT:
        with pytest.raises(ValueError, match=r"applies no attention dropout .*got dropout=0.5"):
            _twin(layer, dropout=0.5)
        return
    dropped = _twin(layer, dropout=0.5)
    x = _x(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(dropped(x, is_causal=True)[0], layer(x, is_causal=True)[0], atol=0, rtol=0)
        reference = layer.train()(x, is_causal=True)[0]
    dropped.train()
    with torch.set_grad_enabled(mode == "grad"):
        out = dropped(x, is_causal=True)[0]
    assert not torch.allclose(out.detach(), reference), f"{name}: dropout=0.5 changed nothing in training ({mode})"


# -- masks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_key_padding_equals_the_unpadded_sequence(name):
    layer = _layer(name)
    x = _x(2, 7)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    if not TRAITS[name].masks:
        with pytest.raises(ValueError, match="unpadded batches"):
            layer(x, key_padding_mask=pad, is_causal=True)
        return
    with torch.no_grad():
        out = layer(x, key_padding_mask=pad)[0]
        alone = layer(x[1:, :5])[0]
        full = layer(x[:1])[0]
        float_pad = layer(x, key_padding_mask=torch.zeros(2, 7, dtype=F64).masked_fill(pad, float("-inf")))[0]
    torch.testing.assert_close(out[1, :5], alone[0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out[0], full[0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(float_pad, out, atol=1e-9, rtol=1e-9)
    with torch.no_grad():  # unbatched: a (S,) mask
        torch.testing.assert_close(layer(x[1], key_padding_mask=pad[1])[0][:5], alone[0], atol=1e-9, rtol=1e-9)
        if TRAITS[name].weights:
            out_w, weights = layer(x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
            torch.testing.assert_close(out_w, out, atol=1e-9, rtol=1e-9)
            assert (weights[1, ..., 5:] == 0).all() and (weights[0, ..., 5:] > 0).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_attn_mask_bool_equals_float(name):
    layer = _layer(name)
    T = 7
    x = _x(2, T)
    blocked = torch.rand(T, T, generator=torch.Generator().manual_seed(1)) > 0.6
    blocked.fill_diagonal_(False)
    additive = torch.zeros(T, T, dtype=F64).masked_fill(blocked, float("-inf"))
    if not TRAITS[name].masks:
        for mask in (blocked, additive):
            with pytest.raises(ValueError, match="plain causal masks"):
                layer(x, attn_mask=mask, is_causal=True)
        return
    with torch.no_grad():
        out_bool = layer(x, attn_mask=blocked)[0]
        out_float = layer(x, attn_mask=additive)[0]
        out_3d = layer(x, attn_mask=blocked.expand(2 * H, T, T))[0]
        causal_bool = layer(x, attn_mask=torch.ones(T, T, dtype=torch.bool).triu(1))[0]
        causal = layer(x, is_causal=True)[0]
        plain = layer(x)[0]
    torch.testing.assert_close(out_bool, out_float, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_3d, out_bool, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(causal_bool, causal, atol=1e-9, rtol=1e-9)
    assert not torch.allclose(out_bool, plain)  # the mask did something


# -- KV cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_preallocated_cache_decodes_a_batch_exactly(name):
    """KVCache(max_len=T), batch of 2: prefill, a 3-token chunk, then one token at a time equals the
    full causal forward; the cache is allocated once and refuses a token past max_len."""
    layer = _layer(name)
    T = 22  # past LongHeads' budget of 16
    x = _x(2, T + 1)
    cache = KVCache(max_len=T)
    with torch.no_grad():
        full = layer(x[:, :T], is_causal=True)[0]
        parts = [layer(x[:, :5], is_causal=True, cache=cache)[0]]
        assert cache.capacity == T and cache.seq_len == 5
        storage = cache.k.data_ptr()
        parts.append(layer(x[:, 5:8], is_causal=True, cache=cache)[0])
        parts += [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(8, T)]
        assert cache.seq_len == T and cache.capacity == T and cache.k.data_ptr() == storage
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-9, rtol=1e-9)
        with pytest.raises(ValueError, match=f"KVCache\\(max_len={T}\\) cannot hold {T + 1} tokens"):
            layer(x[:, T:], is_causal=True, cache=cache)


# -- save / load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pruned", [False, True], ids=["whole", "pruned"])
@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_is_exact(name, pruned, tmp_path):
    layer = _layer(name)
    if pruned:
        layer.prune_heads(list(TRAITS[name].keep))
    model = nn.Sequential(layer).eval()
    headmods.save(model, tmp_path / "ckpt")
    fresh = nn.Sequential(_layer(name, seed=1))  # unswapped, other weights, unpruned
    loaded = headmods.load(tmp_path / "ckpt", model=fresh)
    assert type(loaded[0]) is type(layer) and loaded[0].config == layer.config
    _same_state(loaded, model)
    x = _x(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded[0](x, is_causal=True)[0],
                                   layer(x, is_causal=True)[0], atol=0, rtol=0)


# -- bad input -----------------------------------------------------------------------------------
BAD_INPUTS = {
    "embed dim": (lambda: _x(2, 5)[..., :-1], ValueError, "last dimension must be 32"),
    "dtype": (lambda: _x(2, 5, dtype=torch.float32), TypeError, "dtype torch.float32 differs .* torch.float64"),
    "integer": (lambda: torch.ones(2, 5, E, dtype=torch.long), TypeError, "must be a floating-point tensor"),
    "nan": (lambda: _x(2, 5).index_fill_(1, torch.tensor([2]), float("nan")), ValueError, "query contains NaN"),
    "inf": (lambda: _x(2, 5).index_fill_(1, torch.tensor([2]), float("inf")), ValueError, "query contains NaN or inf"),
    "rank": (lambda: _x(1, 2, 5), ValueError, "query must be 3-D"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("name", VARIANTS)
def test_bad_input_is_named(name, case):
    make, error, message = BAD_INPUTS[case]
    layer = _layer(name, perturb=False)
    with torch.no_grad(), pytest.raises(error, match=message):
        layer(make(), is_causal=True)


# -- prune_heads -----------------------------------------------------------------------------------
def _zeroed(layer, dropped):
    """A copy of ``layer`` whose ``dropped`` heads have zero ``o_proj`` columns."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        for i in dropped:
            ref.o_proj.weight[:, i * D:(i + 1) * D] = 0
    return ref


def _tokens_routed_to_kept(name, layer, x, dropped):
    """(B, T) bool: tokens whose routing chose no dropped head, read from the router's own weights."""
    if name == "shrp":  # top-1 over all heads
        choice = (x @ layer.router.weight.T).argmax(-1)
        return ~torch.isin(choice, torch.tensor(dropped))
    c = layer.config  # MoH learned router: top-K over the routed heads h_s..h-1
    top = (x @ layer.router.routed.weight.T).topk(c.active_routed, dim=-1).indices + c.shared_heads
    return ~torch.isin(top, torch.tensor(dropped)).any(-1)


@pytest.mark.parametrize("name", VARIANTS)
def test_prune_heads_equals_zeroed_heads(name):
    traits = TRAITS[name]
    layer = _layer(name)
    if traits.keep is None:
        with pytest.raises(NotImplementedError, match="cannot remove heads"):
            layer.prune_heads([0])
        return
    keep = list(traits.keep)
    dropped = [i for i in range(H) if i not in keep]
    reference = _zeroed(layer, dropped)
    original = copy.deepcopy(layer)
    assert layer.prune_heads(keep) is layer
    c = layer.config
    assert c.num_heads == len(keep) and c.kept_heads == tuple(keep)
    assert layer.q_proj.out_features == len(keep) * D and layer.o_proj.in_features == len(keep) * D
    x = _x(2, 20)
    with torch.no_grad():
        got = layer(x, is_causal=True)[0]
        want = reference(x, is_causal=True)[0]
    if traits.prune_ref == "routed":
        kept = _tokens_routed_to_kept(name, original, x, dropped)
        assert 0 < int(kept.sum()) < kept.numel()  # both kinds of token occur
        got, want = got[kept], want[kept]
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        # rebuilt from its config alone, it is the same layer (what checkpoints rely on)
        torch.testing.assert_close(_twin(layer)(x, is_causal=True)[0], got_all := layer(x, is_causal=True)[0],
                                   atol=0, rtol=0)
        # and it decodes with a cache (uneven groups: kv_map) as it computes the whole sequence
        cache = KVCache()
        parts = [layer(x[:, :12], is_causal=True, cache=cache)[0]]
        parts += [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), got_all, atol=1e-9, rtol=1e-9)


def test_longheads_refuses_a_partial_kv_group_and_changes_nothing():
    layer = _layer("longheads")
    before = copy.deepcopy(layer)
    with pytest.raises(ValueError, match="contiguous query-head groups .* Prune whole groups"):
        layer.prune_heads([0, 1, 2])
    assert layer.config == before.config
    _same_state(layer, before)


# -- from_mha: each variant's documented start -----------------------------------------------------
def _source():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():  # non-zero biases, so a bias mix-up cannot hide
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mha


def _heads(mha, x):
    """q, k, v heads ``(B, h, T, d)`` of ``nn.MultiheadAttention`` in float64, from its packed weights."""
    w, b = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
    B, T = x.shape[:2]
    q, k, v = F.linear(x.double(), w, b).chunk(3, dim=-1)
    return [t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)]


def _rope_mha(mha, x, theta):
    """The same weights with RoPE (rotate-half pairs, positions 0..T-1) on q and k, causal, float64."""
    q, k, v = _heads(mha, x)
    pos = torch.arange(x.size(1))
    q, k = rope_loop(q, pos, theta), rope_loop(k, pos, theta)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], E)
    return F.linear(out, mha.out_proj.weight.double(), mha.out_proj.bias.double())


def _one_head(mha, router_weight, x):
    """SHRP's start: each token's argmax-routed head's MHA term plus the output bias, float64."""
    q, k, v = _heads(mha, x)
    heads = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, d)
    wo = mha.out_proj.weight.detach().double()
    terms = torch.stack([heads[:, i] @ wo[:, i * D:(i + 1) * D].T for i in range(H)], dim=2)  # (B, T, h, E)
    choice = (x.double() @ router_weight.detach().double().T).argmax(-1)  # (B, T)
    chosen = terms.gather(2, choice[:, :, None, None].expand(-1, -1, 1, E))[:, :, 0]
    return chosen + mha.out_proj.bias.double(), choice


@pytest.mark.parametrize("name", VARIANTS)
def test_from_mha_documented_start(name):
    traits = TRAITS[name]
    mha = _source()
    layer = headmods.get_variant(name).from_mha(mha, **traits.from_mha).eval()
    assert layer.batch_first and layer.num_heads == H and layer.num_kv_heads == H
    x = torch.randn(2, 12, E)
    with torch.no_grad():
        if traits.start == "mha":
            got = layer(x)[0]
            want = mha(x, x, x, need_weights=False)[0]
            # masks and cross-attention (5 queries, 12 keys) as nn.MultiheadAttention computes them
            q, pad = x[:, :5] + 1, torch.zeros(2, 12, dtype=torch.bool)
            pad[0, 9:] = True
            for kw in ({"key_padding_mask": pad}, {"attn_mask": torch.randn(5, 12)},
                       {"attn_mask": torch.rand(5, 12) > 0.7, "key_padding_mask": pad}):
                torch.testing.assert_close(layer(q, x, x, **kw)[0], mha(q, x, x, need_weights=False, **kw)[0],
                                           atol=1e-5, rtol=1e-5)
        elif traits.start == "rope":
            assert layer.config.rope_theta == THETA
            got = layer(x, is_causal=True)[0]
            want = _rope_mha(mha, x, THETA).float()
        else:
            assert traits.start == "one_head"
            got = layer(x)[0]
            want, choice = _one_head(mha, layer.router.weight, x)
            want = want.float()
            assert choice.unique().numel() > 1  # tokens go to several heads
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
