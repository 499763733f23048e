"""headmods.save / load / export: round trips, stock export, refusals, nothing half-written."""

import json
import shutil

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

import headmods
from headmods import MultiHeadAttention
from headmods.io import weights as weights_io

from .test_swap import tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(3))


def _out(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _prune_all(model, keep):
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.prune_heads(keep)


@pytest.mark.parametrize("build,auto", [(tiny_llama, AutoModelForCausalLM), (tiny_bert, AutoModel),
                                        (tiny_gpt2, AutoModelForCausalLM)], ids=["llama", "bert", "gpt2"])
def test_pruned_model_saves_loads_and_exports_to_stock_hf(tmp_path, build, auto):
    model = build()
    headmods.swap(model, "mha")
    _prune_all(model, [0, 3])
    ref = _out(model)
    headmods.save(model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "headmods.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["host"]["kind"] == "hf"
    first = next(iter(manifest["layers"].values()))
    assert first["structure"]["kept_heads"] == [0, 3] and first["variant"] == "mha"
    assert not list(tmp_path.glob("*.pt")) and not list((tmp_path / "ckpt").glob("*.bin"))
    loaded = headmods.load(tmp_path / "ckpt")
    torch.testing.assert_close(_out(loaded), ref, atol=0, rtol=0)
    headmods.export(tmp_path / "ckpt", tmp_path / "hf")
    stock = auto.from_pretrained(tmp_path / "hf").eval()
    assert not any(isinstance(m, headmods.HeadAttention) for m in stock.modules())
    torch.testing.assert_close(_out(stock), ref, atol=1e-5, rtol=1e-5)


def test_llama_export_is_physically_smaller(tmp_path):
    model = tiny_llama()
    n_before = sum(p.numel() for p in model.parameters())
    headmods.swap(model, "mha")
    _prune_all(model, [0, 1])  # drops kv head 1 in every layer
    headmods.export(model, tmp_path / "hf")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 1)
    assert sum(p.numel() for p in stock.parameters()) < n_before


def test_tied_weights_are_stored_once_and_retied(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    headmods.swap(model, "mha")
    headmods.save(model, tmp_path / "ckpt")
    manifest = headmods.io.read_manifest(tmp_path / "ckpt")
    assert manifest["weights"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = headmods.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_out(loaded), _out(model))


def test_sharded_weights_round_trip(tmp_path):
    model = tiny_bert()
    headmods.swap(model, "mha")
    headmods.save(model, tmp_path / "ckpt", max_shard_mb=0.05)
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_out(headmods.load(tmp_path / "ckpt")), _out(model))


def test_torch_host_needs_the_model_and_loads_into_it(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True), 2)

    model = build().eval()
    headmods.swap(model, "mha")
    model.layers[1].self_attn.prune_heads([1, 2])
    headmods.save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"plain torch model .* pass the unswapped model as load\(folder, model=...\)"):
        headmods.load(tmp_path / "ckpt")
    fresh = headmods.load(tmp_path / "ckpt", model=build())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert fresh.layers[1].self_attn.num_heads == 2
    with pytest.raises(ValueError, match="stock export needs a transformers host model"):
        headmods.export(model, tmp_path / "hf")


def test_native_layers_round_trip(tmp_path):
    model = nn.Sequential(MultiHeadAttention(16, 4, num_kv_heads=2, batch_first=True, rope_theta=1e4)).eval()
    model[0].prune_heads([0, 1, 2])
    headmods.save(model, tmp_path / "ckpt")
    skeleton = nn.Sequential(MultiHeadAttention(16, 4, num_kv_heads=2, batch_first=True, rope_theta=1e4))
    loaded = headmods.load(tmp_path / "ckpt", model=skeleton)
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(loaded[0](x)[0], model[0](x)[0])
    assert loaded[0].config == model[0].config


def test_export_refusals_name_the_blocking_layer(tmp_path):
    model = tiny_llama()
    headmods.swap(model, "mha")
    model.model.layers[1].self_attn.prune_heads([0, 1, 2])
    with pytest.raises(ValueError, match=r"uneven kv groups"):
        headmods.export(model, tmp_path / "a")
    model = tiny_llama()
    headmods.swap(model, "mha")
    model.model.layers[1].self_attn.prune_heads([0, 2])
    with pytest.raises(ValueError, match=r"layers differ in \(heads, kv heads, head_dim\): \[\(2, 2, 16\), \(4, 2, 16\)\]"):
        headmods.export(model, tmp_path / "b")

    class Other(MultiHeadAttention):
        pass

    headmods.register_variant("test_other")(Other)
    try:
        model = tiny_llama()
        headmods.swap(model, "test_other")
        with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn' is 'test_other'"):
            headmods.export(model, tmp_path / "c")
    finally:
        headmods.registry._VARIANTS.pop("test_other")
    with pytest.raises(ValueError, match="export target must be 'hf', got 'onnx'"):
        headmods.export(model, tmp_path / "d", to="onnx")
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d"))


@pytest.fixture
def saved(tmp_path):
    model = tiny_bert()
    headmods.swap(model, "mha")
    headmods.save(model, tmp_path / "ckpt", max_shard_mb=0.05)
    return tmp_path / "ckpt"


def test_missing_shard(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard\\(s\\) that are missing: \\['{victim.name}'\\]"):
        headmods.load(saved)


def test_truncated_safetensors(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read {victim.name} .*truncated, corrupt"):
        headmods.load(saved)


def test_structure_and_weights_disagree(saved):
    manifest = json.loads((saved / "headmods.json").read_text())
    entry = manifest["layers"]["encoder.layer.0.attention"]
    entry["config"].update(num_heads=2, num_kv_heads=2, head_dim=16)  # claims a pruned layer
    (saved / "headmods.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"layers.encoder.layer.0.attention.structure.num_heads must be 2 as "
                                         r"layers.encoder.layer.0.attention.config says, got 4"):
        headmods.load(saved)
    entry["structure"].update(num_heads=2, num_kv_heads=2, head_dim=16)  # structure edited to agree
    (saved / "headmods.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"disagree on layers.encoder.layer.0.attention.structure.num_heads: "
                                         r"the manifest says 2, the weights file was saved with 4"):
        headmods.load(saved)


def test_invalid_layer_entry_names_the_layer(saved):
    manifest = json.loads((saved / "headmods.json").read_text())
    manifest["layers"]["encoder.layer.1.attention"]["config"]["num_heads"] = 3
    (saved / "headmods.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"layer 'encoder.layer.1.attention' in headmods.json is invalid: .*must divide num_heads \(3\)"):
        headmods.load(saved)


def test_missing_and_corrupt_manifest(saved):
    (saved / "headmods.json").write_text("{not json")
    with pytest.raises(ValueError, match="headmods.json is not valid JSON"):
        headmods.load(saved)
    (saved / "headmods.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a headmods checkpoint: headmods.json is missing"):
        headmods.load(saved)


def test_extra_and_missing_keys_are_named(tmp_path):
    model = nn.Sequential(MultiHeadAttention(16, 2))
    headmods.save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"missing keys \['1.bias', '1.weight'\]"):
        headmods.load(tmp_path / "ckpt", model=nn.Sequential(MultiHeadAttention(16, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"unexpected keys \['1.bias', '1.weight'\]"):
        bigger = nn.Sequential(MultiHeadAttention(16, 2), nn.Linear(2, 2))
        headmods.save(bigger, tmp_path / "big")
        headmods.load(tmp_path / "big", model=nn.Sequential(MultiHeadAttention(16, 2)))


def test_nothing_is_written_half_way(tmp_path, monkeypatch):
    model = tiny_bert()
    headmods.swap(model, "mha")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(weights_io.__name__ + ".split_aliases", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        headmods.save(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # no destination, no temporary folder left behind


def test_existing_destination_and_source_are_protected(tmp_path):
    model = nn.Sequential(MultiHeadAttention(16, 2))
    headmods.save(model, tmp_path / "ckpt")
    stamp = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        headmods.save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="refusing to write .* it is \\(inside\\) the source checkpoint"):
        headmods.save(model, tmp_path / "ckpt", source=tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == stamp
    with torch.no_grad():
        model[0].q_proj.weight.add_(1.0)
    headmods.save(model, tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() != stamp


def test_provenance_and_card(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"0123")
    model = nn.Sequential(MultiHeadAttention(16, 2))
    headmods.save(model, tmp_path / "ckpt", source=src, provenance={"seed": 7}, card={"metrics": {"acc": 0.5}})
    prov = headmods.io.read_manifest(tmp_path / "ckpt")["provenance"]
    import hashlib

    assert prov["source_sha256"] == {"model.safetensors": hashlib.sha256(b"0123").hexdigest()} and prov["seed"] == 7
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "| acc | 0.5 |" in card and "`0`" in card
    shutil.rmtree(src)
