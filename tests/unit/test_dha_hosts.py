"""DHA inside a Hugging Face LLaMA: exact start, cache heads, generate, save/load, stock export."""

import pytest
import torch
from transformers import DynamicCache

import headmods
from headmods.convert.dha import collapse, input_moments, plan_dha, plan_gqa, to_dha
from headmods.convert.dha_fusion import attach_fusion

from .test_swap import V, tiny_llama


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return tiny_llama(num_attention_heads=8, num_key_value_heads=4)  # GQA source: 8 query, 4 kv heads


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_dha_swap_and_identity_fusion_equal_the_source(llama):
    ids = torch.randint(1, V, (2, 9))
    reference = _logits(llama, ids)
    layers = to_dha(llama)
    torch.testing.assert_close(_logits(llama, ids), reference, atol=1e-5, rtol=1e-5)
    plan = plan_dha(layers, 0.5, moments=input_moments(llama, layers, [{"input_ids": ids}]))
    attach_fusion(layers, plan.groups)
    torch.testing.assert_close(_logits(llama, ids), reference, atol=1e-5, rtol=1e-5)


def test_decoupled_model_caches_only_its_heads_and_decodes_like_a_full_forward(llama, tmp_path):
    layers = to_dha(llama)
    collapse(layers, plan_dha(layers, 0.375))  # 6 of 16 K+V heads over 2 layers
    ids = torch.randint(1, V, (2, 7))
    full = _logits(llama, ids)
    cache = DynamicCache(config=llama.config)
    steps = [_logits(llama, ids[:, :4], cache=cache, use_cache=True)]
    steps += [_logits(llama, ids[:, t:t + 1], cache=cache, use_cache=True) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    for i, (path, layer) in enumerate(layers.items()):
        assert cache.layers[i].keys.size(1) == layer.num_kv_heads
        assert cache.layers[i].values.size(1) == layer.config.num_v_heads
    assert sum(m.num_kv_heads + m.config.num_v_heads for m in layers.values()) == 6
    out = llama.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 10)
    headmods.save(llama, tmp_path / "dha")
    reloaded = headmods.load(tmp_path / "dha")
    torch.testing.assert_close(_logits(reloaded, ids), full, atol=1e-6, rtol=1e-6)
    decoupled = [p for p, m in layers.items() if not m.config.is_gqa()]
    assert decoupled, "the plan should leave at least one layer that is not plain GQA"
    with pytest.raises(ValueError, match=rf"layer '{decoupled[0]}' \(dha\) has no stock transformers equivalent"):
        headmods.export(llama, tmp_path / "stock")


def test_gqa_shaped_dha_exports_to_a_stock_llama(llama, tmp_path):
    ids = torch.randint(1, V, (2, 6))
    layers = to_dha(llama)
    collapse(layers, plan_gqa(layers, 0.5))  # 2 kv heads per layer, shared by K and V
    expected = _logits(llama, ids)
    folder = headmods.export(llama, tmp_path / "stock")
    from transformers import LlamaForCausalLM

    stock = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert stock.config.num_key_value_heads == 2
    torch.testing.assert_close(_logits(stock, ids), expected, atol=1e-5, rtol=1e-5)
