"""headmods.swap into torch, Hugging Face (tiny configs) and timm-style hosts."""

import pytest
import torch
from torch import nn

import headmods
from headmods import HeadAttention, MultiHeadAttention

from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

V = 101


__all__ = ["tiny_llama", "tiny_bert", "tiny_gpt2", "V"]


def tiny_llama(**kw):
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=V, rope_theta=500.0)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def tiny_bert():
    return BertModel(BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=V)).eval()


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, bos_token_id=0,
                                      eos_token_id=0)).eval()


@pytest.fixture
def ids():
    return torch.randint(1, V, (2, 9))


@pytest.fixture
def padding():
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return mask


def test_llama_logits_and_greedy_generate_are_unchanged(ids, padding):
    model = tiny_llama()
    with torch.no_grad():
        ref = model(ids, attention_mask=padding).logits
        ref_gen = model.generate(ids, attention_mask=padding, max_new_tokens=8, do_sample=False, pad_token_id=0)
    report = headmods.swap(model, "mha")
    assert report.paths == ["model.layers.0.self_attn", "model.layers.1.self_attn"] and report.param_delta == 0
    layer = model.model.layers[0].self_attn
    assert isinstance(layer, MultiHeadAttention) and (layer.num_heads, layer.num_kv_heads) == (4, 2)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # host names kept
    with torch.no_grad():
        out = model(ids, attention_mask=padding).logits
        gen = model.generate(ids, attention_mask=padding, max_new_tokens=8, do_sample=False, pad_token_id=0)
    keep = padding.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


def test_llama_keyword_spellings_of_the_cache():
    from transformers import DynamicCache

    model = tiny_llama()
    headmods.swap(model, "mha")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(3)[None])
    outs = []
    for key in ("cache", "past_key_values", "past_key_value"):
        cache = DynamicCache(config=model.config)
        out, _ = attn(x, position_embeddings=(cos, sin), **{key: cache}, use_cache=True, position_ids=None)
        assert cache.get_seq_length(0) == 3
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_bert_hidden_states_are_unchanged(ids, padding):
    model = tiny_bert()
    with torch.no_grad():
        ref = model(ids, attention_mask=padding).last_hidden_state
    headmods.swap(model, "mha")
    attn = model.encoder.layer[0].attention
    assert isinstance(attn, HeadAttention) and isinstance(attn.LayerNorm, nn.LayerNorm)
    with torch.no_grad():
        out = model(ids, attention_mask=padding).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gpt2_logits_and_generate_are_unchanged(ids):
    model = tiny_gpt2()
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    headmods.swap(model, "mha")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), ref_gen)


def test_swapped_hf_model_trains(ids):
    model = tiny_llama()
    headmods.swap(model, "mha", impl="eager")
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def _encoder():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2)  # nested tensors on: the trap swap must defuse


@pytest.mark.parametrize("mode", ["train", "eval", "eval_padding"])
def test_transformer_encoder(mode):
    torch.manual_seed(0)
    encoder = _encoder()
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    if mode == "eval_padding":
        pad[1, -2:] = True
    encoder.train(mode == "train")
    with torch.no_grad():
        ref = encoder(x, src_key_padding_mask=pad if mode == "eval_padding" else None)
    report = headmods.swap(encoder, "mha")
    assert report.paths == ["layers.0.self_attn", "layers.1.self_attn"]
    assert encoder.use_nested_tensor is False
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=pad if mode == "eval_padding" else None)
    keep = ~pad
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_transformer_decoder_self_and_cross_attention():
    layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoder(layer, num_layers=1).eval()
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        ref = decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
        report = headmods.swap(decoder, "mha")
        out = decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    assert report.paths == ["layers.0.self_attn", "layers.0.multihead_attn"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class StubTimmAttention(nn.Module):
    """The timm ViT Attention contract, written out: fused qkv, proj, num_heads, SDPA."""

    def __init__(self, dim, num_heads, qkv_bias=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_timm_style_attention(qkv_bias):
    block = nn.Sequential(nn.LayerNorm(48), StubTimmAttention(48, 6, qkv_bias=qkv_bias)).eval()
    x = torch.randn(2, 10, 48)
    keep = torch.rand(2, 1, 10, 10) > 0.3
    keep[..., 0] = True
    with torch.no_grad():
        ref = block[1](block[0](x), attn_mask=keep)
        headmods.swap(block, "mha")
        out = block[1](block[0](x), attn_mask=keep)
    assert isinstance(block[1], HeadAttention) and isinstance(out, torch.Tensor)
    assert (block[1].q_proj.bias is None) == (not qkv_bias) and block[1].o_proj.bias is not None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_real_timm_if_installed():
    timm = pytest.importorskip("timm")  # optional: timm is not a dependency (it pulls torchvision)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        headmods.swap(model, "mha")
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_targets_paths_and_predicate(ids):
    model = tiny_llama()
    report = headmods.swap(model, "mha", targets=["model.layers.1.self_attn"])
    assert report.paths == ["model.layers.1.self_attn"]
    assert not isinstance(model.model.layers[0].self_attn, HeadAttention)
    model = tiny_llama()
    report = headmods.swap(model, "mha", targets=lambda name, m: name.endswith("0.self_attn"))
    assert report.paths == ["model.layers.0.self_attn"]


def test_random_init_changes_the_function(ids):
    model = tiny_llama()
    with torch.no_grad():
        ref = model(ids).logits
        headmods.swap(model, "mha", init="random")
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)


def test_unknown_host_and_bad_arguments():
    with pytest.raises(ValueError, match=r"no supported attention module found in Sequential.*Supported hosts:.*"
                                         r"torch_mha.*hf_llama.*targets="):
        headmods.swap(nn.Sequential(nn.Linear(4, 4)), "mha")
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) is not a supported host.*targets="):
        headmods.swap(nn.Sequential(nn.Linear(4, 4)), "mha", targets=["0"])
    with pytest.raises(ValueError, match=r"targets name modules that do not exist: \['nope'\]"):
        headmods.swap(nn.Sequential(nn.Linear(4, 4)), "mha", targets=["nope"])
    with pytest.raises(ValueError, match=r"init must be one of \('copy', 'random'\), got 'zeros'"):
        headmods.swap(_encoder(), "mha", init="zeros")
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        headmods.swap(_encoder(), "nope")


def test_failed_swap_leaves_the_model_untouched():
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        headmods.swap(encoder, "mha", num_kv_heads=3)
    assert isinstance(encoder.layers[0].self_attn, nn.MultiheadAttention)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_hosts_with_parts_headmods_cannot_reproduce_are_refused():
    model = tiny_llama()
    model.model.layers[0].self_attn.q_norm = nn.LayerNorm(16)  # a Qwen3-style q norm
    with pytest.raises(ValueError, match=r"parameterized parts \['q_norm'\] that headmods does not reproduce"):
        headmods.swap(model, "mha")


def test_registered_attention_function_keeps_the_causal_mask(ids, padding):
    from headmods.integrations.hf import register_attention

    model = tiny_llama()
    with torch.no_grad():
        ref = model(ids, attention_mask=padding).logits
    register_attention("headmods_sdpa")
    model.set_attn_implementation("headmods_sdpa")
    with torch.no_grad():
        out = model(ids, attention_mask=padding).logits
        no_pad = model(ids).logits
    keep = padding.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(no_pad, model(ids).logits, atol=1e-5, rtol=1e-5)  # causal kept
    with pytest.raises(ValueError, match="unknown mask builder 'nope'"):
        register_attention("headmods_bad", mask="nope")


def test_padding_only_hf_masks_become_key_bias():
    from headmods.integrations.hf.common import hf_mask

    keys = torch.tensor([[True, True, True, False], [False, True, True, True]])  # (B, Tk)
    square = keys[:, None, None, :].expand(2, 1, 4, 4).clone()
    m = hf_mask(square, causal=False)
    assert m.bias.shape == (2, 1, 1, 4) and not m.causal
    causal = square & torch.ones(4, 4, dtype=torch.bool).tril()
    m = hf_mask(causal, causal=True)
    assert m.bias.shape == (2, 1, 1, 4) and m.causal
    odd = causal.clone()
    odd[0, 0, 2, 0] = False  # not padding, not causal: kept as a full mask
    assert hf_mask(odd, causal=True).bias.shape == (2, 1, 4, 4)
