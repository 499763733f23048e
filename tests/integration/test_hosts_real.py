"""Acceptance on real checkpoints: MiniLM (BERT) and SmolLM2-135M (LLaMA with GQA)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

import headmods
from headmods.prune import head_importance, plan_from_scores, prune_heads


def embed(model, tokenizer, sentences):
    """all-MiniLM-L6-v2 sentence embeddings: mean of token states over the mask, L2-normalized."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm_swapped(minilm):
    model = copy.deepcopy(minilm)
    report = headmods.swap(model, "mha")
    assert len(report.paths) == 6 and report.param_delta == 0
    return model


def test_minilm_swap_keeps_sentence_embeddings(minilm, minilm_swapped, minilm_tokenizer, bbc_sentences):
    ref = embed(minilm, minilm_tokenizer, bbc_sentences[:16])
    out = embed(minilm_swapped, minilm_tokenizer, bbc_sentences[:16])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_minilm_save_and_load_is_identical(minilm_swapped, minilm_tokenizer, minilm_dir, bbc_sentences, tmp_path):
    headmods.save(minilm_swapped, tmp_path / "ckpt", tokenizer=minilm_dir, source=minilm_dir)
    manifest = headmods.io.read_manifest(tmp_path / "ckpt")
    assert manifest["provenance"]["source_sha256"]["model.safetensors"].startswith("53aa5117")
    loaded = headmods.load(tmp_path / "ckpt")
    assert all(not p.name.endswith((".bin", ".pt", ".pkl")) for p in (tmp_path / "ckpt").iterdir())
    torch.testing.assert_close(embed(loaded, minilm_tokenizer, bbc_sentences[:8]),
                               embed(minilm_swapped, minilm_tokenizer, bbc_sentences[:8]), atol=0, rtol=0)


@pytest.mark.slow
def test_smollm2_swap_keeps_logits_and_greedy_generation(smollm2, smollm2_tokenizer):
    prompt = smollm2_tokenizer(["The capital of France is", "Water boils at a temperature of"],
                               return_tensors="pt", padding=True)
    with torch.no_grad():
        ref_logits = smollm2(**prompt).logits
        ref_gen = smollm2.generate(**prompt, max_new_tokens=20, do_sample=False)
    model = copy.deepcopy(smollm2)
    report = headmods.swap(model, "mha")
    assert len(report.paths) == 30
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (9, 3, 64)
    with torch.no_grad():
        logits = model(**prompt).logits
        gen = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    keep = prompt["attention_mask"].bool()
    torch.testing.assert_close(logits[keep], ref_logits[keep], atol=1e-4, rtol=0)
    assert torch.equal(gen, ref_gen) and gen.shape[1] == prompt["input_ids"].shape[1] + 20


@pytest.mark.slow
def test_minilm_half_heads_pruned_by_ablation(minilm_swapped, minilm_tokenizer, minilm_dir, bbc_sentences, tmp_path):
    model = copy.deepcopy(minilm_swapped)
    batches = []
    for i in range(0, 64, 16):  # 64 calibration sentences, 4 batches
        chunk = bbc_sentences[i:i + 16]
        batches.append((chunk, embed(model, minilm_tokenizer, chunk)))

    def loss_fn(m, batch):  # how far a head's removal moves the sentence embeddings
        sentences, reference = batch
        return (1 - (embed(m, minilm_tokenizer, sentences) * reference).sum(-1)).mean()

    scores = head_importance(model, "ablation", batches=batches, loss_fn=loss_fn)
    assert set(scores) == {f"encoder.layer.{i}.attention" for i in range(6)}
    plan = plan_from_scores(scores, ratio=0.5, uniform=True, model=model)
    assert all(len(kept) == 6 for kept in plan.keep.values())

    zeroed = copy.deepcopy(model)  # the oracle: same model, removed heads' outputs zeroed by hand
    with torch.no_grad():
        for path, kept in plan.keep.items():
            o = zeroed.get_submodule(path).o_proj.weight
            for head in set(range(12)) - set(kept):
                o[:, head * 32:(head + 1) * 32] = 0.0
    params_before = sum(p.numel() for p in model.parameters())
    report = prune_heads(model, plan)
    removed_per_layer = 3 * (6 * 32) * 384 + 3 * (6 * 32) + 384 * (6 * 32)  # q/k/v rows + biases, o columns
    assert sum(p.numel() for p in model.parameters()) == params_before - 6 * removed_per_layer == report.params_after
    sentences = bbc_sentences[:16]
    pruned_emb = embed(model, minilm_tokenizer, sentences)
    torch.testing.assert_close(pruned_emb, embed(zeroed, minilm_tokenizer, sentences), atol=1e-5, rtol=0)

    headmods.save(model, tmp_path / "pruned", tokenizer=minilm_dir, card={"prune_report": report.to_markdown()})
    loaded = headmods.load(tmp_path / "pruned")
    assert loaded.encoder.layer[3].attention.q_proj.weight.shape == (6 * 32, 384)
    torch.testing.assert_close(embed(loaded, minilm_tokenizer, sentences), pruned_emb, atol=0, rtol=0)

    headmods.export(tmp_path / "pruned", tmp_path / "pruned-hf")
    stock = AutoModel.from_pretrained(tmp_path / "pruned-hf").eval()
    assert type(stock).__name__ == "BertModel" and stock.config.num_attention_heads == 6
    torch.testing.assert_close(embed(stock, minilm_tokenizer, sentences), pruned_emb, atol=1e-5, rtol=0)


def test_minilm_moh_with_all_heads_and_neutral_router_keeps_embeddings(minilm, minilm_tokenizer, bbc_sentences):
    model = copy.deepcopy(minilm)
    headmods.swap(model, "moh", shared_heads=4, active_routed=8, router_init="zero")
    attn = model.encoder.layer[0].attention
    assert type(attn).variant == "moh" and attn.config.routed_heads == 8
    ref = embed(minilm, minilm_tokenizer, bbc_sentences[:16])
    torch.testing.assert_close(embed(model, minilm_tokenizer, bbc_sentences[:16]), ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_moh_qnorm_with_all_heads_keeps_logits_and_saves(smollm2, smollm2_tokenizer, tmp_path):
    prompt = smollm2_tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = smollm2(**prompt).logits
    model = copy.deepcopy(smollm2)
    headmods.swap(model, "moh", shared_heads=4, active_routed=5, router="qnorm")
    keep = prompt["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits[keep], ref[keep], atol=1e-4, rtol=0)
    # the 78 %-active conversion changes the function; it must still load back exactly
    sparse = copy.deepcopy(smollm2)
    headmods.swap(sparse, "moh", shared_heads=4, active_routed=3, router="qnorm")
    headmods.save(sparse, tmp_path / "moh")
    loaded = headmods.load(tmp_path / "moh")
    ids = smollm2_tokenizer(["Python lists are mutable sequences."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, sparse(ids).logits, atol=0, rtol=0)


@pytest.mark.slow
def test_smollm2_cmha_at_the_rope_start_keeps_logits(smollm2, smollm2_tokenizer):
    prompt = smollm2_tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = smollm2(**prompt).logits
    model = copy.deepcopy(smollm2)
    report = headmods.swap(model, "cmha")  # delta = 1, beta = 0 on the host's own RoPE
    attn = model.model.layers[0].self_attn
    assert type(attn).variant == "cmha" and len(report.paths) == 30
    assert tuple(attn.delta.shape) == (3, 32) and tuple(attn.beta.shape) == (9, 32)  # delta per kv head (GQA)
    keep = prompt["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits[keep], ref[keep], atol=1e-4, rtol=0)
