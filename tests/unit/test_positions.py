"""Per-variant positions of the compare recipe: host RoPE switched off, learned absolute embeddings, checks."""

import inspect

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import headmods
from headmods.recipes.config import CompareConfig, ConfigError, RecipeConfig
from headmods.recipes.positions import AbsolutePositionEmbedding, check_positions, set_positions

V = 97


def tiny_llama(rope_theta: float = 10000.0, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=V, rope_theta=rope_theta, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def swapped(variant: str, positions: str, rope_theta: float, **settings) -> LlamaForCausalLM:
    model = tiny_llama(rope_theta)
    headmods.swap(model, variant, **settings)
    return set_positions(model, positions)


def logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant,settings", [("mha", {}), ("rcmha", {"relative_buckets": 8,
                                                                     "max_relative_position": 16})])
def test_positions_none_ignores_the_host_rope_and_rope_uses_it(variant, settings):
    def run(positions: str, theta: float) -> torch.Tensor:
        model = swapped(variant, positions, theta, **settings)
        if variant == "rcmha":  # non-zero relative terms, the same in both models
            for layer in model.model.layers:
                torch.manual_seed(3)
                nn.init.normal_(layer.self_attn.rel_key, std=0.5)
        return logits(model, IDS)

    assert torch.allclose(run("none", 10000.0), run("none", 10.0), atol=1e-6, rtol=0)
    assert (run("rope", 10000.0) - run("rope", 10.0)).abs().max() > 1e-3


def test_adapter_host_rope_flag_passes_or_drops_the_hosts_cos_sin():
    model = tiny_llama()
    headmods.swap(model, "mha")
    layer = model.model.layers[0].self_attn
    x = torch.randn(1, 6, 64)
    ropes = [tuple(torch.randn(1, 6, 16) for _ in range(2)) for _ in range(2)]
    with torch.no_grad():
        with_rope = [layer(x, position_embeddings=r)[0] for r in ropes]
        layer.host_rope = False
        without = [layer(x, position_embeddings=r)[0] for r in ropes]
        plain = layer(x, position_embeddings=None)[0]
    assert (with_rope[0] - with_rope[1]).abs().max() > 1e-3
    assert torch.equal(without[0], without[1]) and torch.equal(without[0], plain)


def test_absolute_embedding_adds_the_rows_of_positions_0_to_t_minus_1():
    tokens = nn.Embedding(10, 4)
    emb = AbsolutePositionEmbedding(tokens, max_positions=8)
    ids = torch.tensor([[1, 2, 3], [9, 0, 5]])
    expected = torch.stack([torch.stack([tokens.weight[ids[b, t]] + emb.positions.weight[t] for t in range(3)])
                            for b in range(2)])
    assert torch.equal(emb(ids), expected)
    assert emb.weight is tokens.weight and emb(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 4)
    with pytest.raises(ValueError, match="cover 8 positions; got a sequence of 9 tokens"):
        emb(torch.zeros(1, 9, dtype=torch.long))


def test_absolute_embedding_init_is_small_zero_mean_normal():
    emb = AbsolutePositionEmbedding(nn.Embedding(10, 64), max_positions=512, std=0.02)
    w = emb.positions.weight.detach()
    assert abs(float(w.mean())) < 2e-3 and 0.018 < float(w.std()) < 0.022


def test_absolute_model_adds_positions_only_and_keeps_the_tie():
    none = swapped("mha", "none", 10000.0)
    absolute = swapped("mha", "absolute", 10000.0)
    emb = absolute.get_input_embeddings()
    assert isinstance(emb, AbsolutePositionEmbedding) and absolute.lm_head.weight is emb.tokens.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(absolute) - count(none) == 32 * 64
    assert (logits(absolute, IDS) - logits(none, IDS)).abs().max() > 1e-4
    with torch.no_grad():
        emb.positions.weight.zero_()
    assert torch.allclose(logits(absolute, IDS), logits(none, IDS), atol=1e-6, rtol=0)


def test_absolute_model_refuses_cached_decoding_and_shifted_position_ids():
    model = swapped("mha", "absolute", 10000.0)
    with torch.no_grad():
        out = model(input_ids=IDS[:, :5], use_cache=True)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = getattr(out, name)
        assert cache.get_seq_length() == 5
        with pytest.raises(ValueError, match="cached decoding"):
            model(input_ids=IDS[:, 5:6], use_cache=True, **{name: cache})
        with pytest.raises(ValueError, match="position_ids"):
            model(input_ids=IDS[:, :4], position_ids=torch.arange(2, 6)[None])


def test_bad_positions_values_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"compare.variants.x.positions must be one of \('rope', 'absolute', "
                                         r"'none'\), got 'sinusoidal'"):
        check_positions("x", "mha", "sinusoidal")
    with pytest.raises(ValueError, match="positions must be one of .*got 'learned'"):
        set_positions(tiny_llama(), "learned")
    assert check_positions("r", "rcmha", "none") == "none"


@pytest.mark.parametrize("positions", ["none", "absolute"])
def test_cmha_without_rope_is_refused_naming_the_variant(positions):
    with pytest.raises(ValueError, match=f"compare.variants.ph: variant 'cmha' needs rotary positions .*got "
                                         f"'{positions}'"):
        CompareConfig(variants={"base": {"variant": "mha"}, "ph": {"variant": "cmha", "positions": positions}})
    data = {"recipe": "compare", "output_dir": "x", "data": {"kind": "pydoc"},
            "model": {"source": None, "task": "causal-lm", "tokenizer": "bpe:512", "scratch": {"model_type": "llama"}},
            "compare": {"variants": {"lh": {"variant": "longheads", "positions": positions}}}}
    with pytest.raises(ConfigError, match="compare.variants.lh: variant 'longheads' needs rotary positions"):
        RecipeConfig.from_dict(data)


def test_compare_entries_refuse_unknown_keys():
    with pytest.raises(ValueError, match="compare.variants.a must be"):
        CompareConfig(variants={"a": {"variant": "mha", "position": "none"}})


def test_positions_off_rope_need_headmods_layers_in_a_llama_host():
    with pytest.raises(ValueError, match="'none' .*LLaMA-family model; LlamaForCausalLM has none"):
        set_positions(tiny_llama(), "none")  # nothing swapped in yet
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=V, n_positions=32))
    headmods.swap(gpt2, "mha")
    with pytest.raises(ValueError, match="'absolute' .*GPT2LMHeadModel has none"):
        set_positions(gpt2, "absolute")
    assert set_positions(gpt2, "rope") is gpt2  # rope: the host's own positions, untouched
