"""Bad input: each error names what was expected and what was given."""

import re

import pytest
import torch
from torch import nn

import headmods
from headmods import KVCache, MultiHeadAttention

E, H = 16, 4


@pytest.fixture
def layer():
    return MultiHeadAttention(E, H, batch_first=True)


@pytest.mark.parametrize("shape", [(E,), (1, 2, 3, E)])
def test_wrong_rank(layer, shape):
    expected = f"query must be 3-D (batch, seq, embed_dim) or unbatched 2-D (seq, embed_dim), got shape {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        layer(torch.randn(*shape))


def test_embed_dim_mismatch(layer):
    with pytest.raises(ValueError, match=r"query last dimension must be 16, got shape \(2, 3, 8\)"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"key last dimension must be 16, got shape \(2, 3, 8\)"):
        layer(torch.randn(2, 3, E), torch.randn(2, 3, 8))


def test_key_value_rank_and_batch_mismatch(layer):
    with pytest.raises(ValueError, match=r"key must have the same rank as query \(3\)"):
        layer(torch.randn(2, 3, E), torch.randn(3, E))
    with pytest.raises(ValueError, match="batch sizes differ: 2, 3, 3"):
        layer(torch.randn(2, 3, E), torch.randn(3, 3, E))
    with pytest.raises(ValueError, match="key and value lengths differ: 3 vs 4"):
        layer(torch.randn(2, 3, E), torch.randn(2, 3, E), torch.randn(2, 4, E))


@pytest.mark.parametrize("kwargs,message", [
    ({"embed_dim": 10, "num_heads": 4}, r"num_heads \(4\) must divide embed_dim \(10\)"),
    ({"embed_dim": 16, "num_heads": 4, "num_kv_heads": 3}, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    ({"embed_dim": 16, "num_heads": 0}, "num_heads must be an int >= 1, got 0"),
    ({"embed_dim": 16, "num_heads": 4, "dropout": 1.5}, r"dropout must be a float in \[0, 1\), got 1.5"),
    ({"embed_dim": 16, "num_heads": 4, "impl": "flash"}, "impl must be one of .* got 'flash'"),
    ({"embed_dim": 12, "num_heads": 4, "rope_theta": 1e4}, "even head_dim, got 3"),
    ({"embed_dim": 16, "num_heads": 4, "num_kv_heads": 2, "kv_map": (0, 0, 0, 0)}, r"kv heads \[1\] unused"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(kwargs.pop("embed_dim"), kwargs.pop("num_heads"), **kwargs)


def test_unknown_setting_lists_known_ones():
    with pytest.raises(TypeError, match=r"unknown settings \['heads_kv'\]; its settings are .*num_kv_heads"):
        MultiHeadAttention(E, H, heads_kv=2)


def test_mask_wrong_shape_and_dtype(layer):
    x = torch.randn(2, 3, E)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, key_len\) = \(2, 3\), got \(2, 4\)"):
        layer(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(query_len, key_len\) = \(3, 3\).*got \(2, 2\)"):
        layer(x, attn_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating-point tensor, got dtype torch.int64"):
        layer(x, key_padding_mask=torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(layer, bad):
    x = torch.randn(2, 3, E)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="query contains NaN or inf"):
        layer(x)
    with pytest.raises(ValueError, match="key contains NaN or inf"):
        layer(torch.randn(2, 3, E), x)


def test_large_finite_input_is_not_mistaken_for_overflow(layer):
    x = torch.full((2, 3, E), 1e37)  # finite values whose float32 sum overflows to inf
    assert not torch.isfinite(x.sum())
    out, _ = layer(x)  # no "contains NaN or inf" error
    assert out.shape == (2, 3, E)


def test_empty_sequences_and_batches(layer):
    with pytest.raises(ValueError, match=r"empty sequence: query shape \(2, 0, 16\)"):
        layer(torch.randn(2, 0, E))
    with pytest.raises(ValueError, match=r"empty sequence: .*key shape \(2, 0, 16\)"):
        layer(torch.randn(2, 3, E), torch.randn(2, 0, E))
    with pytest.raises(ValueError, match=r"empty batch: query has shape \(0, 3, 16\)"):
        layer(torch.randn(0, 3, E))


def test_dtype_errors(layer):
    with pytest.raises(TypeError, match="query must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(2, 3, E, dtype=torch.long))
    with pytest.raises(TypeError, match="input dtype torch.float64 differs from the layer's parameter dtype torch.float32"):
        layer(torch.randn(2, 3, E, dtype=torch.float64))
    with pytest.raises(TypeError, match="key dtype torch.float64 differs from query dtype torch.float32"):
        layer(torch.randn(2, 3, E), torch.randn(2, 3, E, dtype=torch.float64))
    with pytest.raises(TypeError, match="query must be a torch.Tensor, got list"):
        layer([[1.0]])


def test_positions_need_rope_and_right_shape(layer):
    with pytest.raises(ValueError, match="no rotary embeddings"):
        layer(torch.randn(2, 3, E), positions=torch.arange(3))
    rope = MultiHeadAttention(E, H, batch_first=True, rope_theta=1e4)
    with pytest.raises(ValueError, match=r"positions must have shape \(seq_len,\) = \(3,\).*got \(4,\)"):
        rope(torch.randn(2, 3, E), positions=torch.arange(4))
    with pytest.raises(ValueError, match="query length 3 != key length 5"):
        rope(torch.randn(2, 3, E), torch.randn(2, 5, E))


def test_cache_errors():
    with pytest.raises(ValueError, match="max_len must be a positive int or None, got 0"):
        KVCache(0)
    layer = MultiHeadAttention(E, H, batch_first=True)
    cache = KVCache(max_len=4)
    layer(torch.randn(2, 3, E), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match=r"KVCache\(max_len=4\) cannot hold 5 tokens"):
        layer(torch.randn(2, 2, E), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match=r"holds \(batch, k_heads, head_dim, v_heads, v_dim, dtype, device\) = \(2, 4,.*got \(3, 4,"):
        layer(torch.randn(3, 1, E), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, key_len\) = \(2, 4\), got \(2, 1\)"):
        layer(torch.randn(2, 1, E), key_padding_mask=torch.zeros(2, 1, dtype=torch.bool), cache=cache)


def test_prune_heads_errors(layer):
    with pytest.raises(ValueError, match="at least one head"):
        layer.prune_heads([])
    with pytest.raises(ValueError, match=r"ints in \[0, 4\), got \[0, 4\]"):
        layer.prune_heads([0, 4])
    with pytest.raises(ValueError, match=r"distinct, got \[1, 1\]"):
        layer.prune_heads([1, 1])
    assert layer.num_heads == H  # nothing changed by the refused calls


def test_from_mha_refuses_unsupported_and_wrong_type():
    with pytest.raises(ValueError, match="add_bias_kv=True or add_zero_attn=True"):
        MultiHeadAttention.from_mha(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(TypeError, match="expects nn.MultiheadAttention, got Linear"):
        MultiHeadAttention.from_mha(nn.Linear(E, E))
    with pytest.raises(ValueError, match=r"does not fit .*num_kv_heads=2"):
        MultiHeadAttention.from_mha(nn.MultiheadAttention(E, H), num_kv_heads=2)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown variant 'nope'; available: \[.*'mha'"):
        headmods.create("nope", E, H)
    with pytest.raises(ValueError, match="already registered"):
        headmods.register_variant("mha")(type("Other", (MultiHeadAttention,), {}))
    with pytest.raises(TypeError, match="expects a HeadAttention subclass"):
        headmods.register_variant("thing")(nn.Linear)
    with pytest.raises(ValueError, match="lower-case identifiers"):
        headmods.register_variant("Bad Name")


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"no fields \['num_head'\]"):
        headmods.AttentionConfig.from_dict({"embed_dim": 16, "num_head": 4})
