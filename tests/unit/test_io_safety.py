"""Files and runs are safe: names from files stay in their folder, overwrite never deletes a user's
files, a killed save leaves a loadable checkpoint and no litter, malformed or edited manifests are
refused with the field named, truncated weight files are named as such."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import headmods
from headmods.errors import (CheckpointError, CorruptFileError, HeadmodsError, OutputExistsError,
                             UnsafePathError)
from headmods.io.atomic import write_atomic

from .test_swap import tiny_llama

MANIFEST = "headmods.json"


def native(prune: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(headmods.MultiHeadAttention(16, 4, num_kv_heads=2, batch_first=True, rope_theta=1e4))
    if prune:
        model[0].prune_heads([0, 1, 2])
    return model.eval()


def edit(folder, change):
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "ckpt"
    headmods.save(native(prune=True), folder)
    return folder


@pytest.fixture
def ckpt(base, tmp_path):
    return shutil.copytree(base, tmp_path / "ckpt")


# -- names taken from files -------------------------------------------------------------------

UNSAFE = ["../victim.txt", "../../victim.txt", "/etc/hostname", "sub/name", "", "..", "."]


@pytest.mark.parametrize("name", UNSAFE)
@pytest.mark.parametrize("field", ["tokenizer_files", "weights.files"])
def test_load_refuses_names_that_leave_the_folder(ckpt, name, field):
    def change(m):
        if field == "tokenizer_files":
            m["tokenizer_files"] = [name]
        else:
            m["weights"]["files"] = [name]

    edit(ckpt, change)
    with pytest.raises(UnsafePathError, match=field.replace(".", r"\.")):
        headmods.load(ckpt, model=native())


def test_index_shard_names_are_checked(tmp_path):
    headmods.save(native(), tmp_path / "ckpt", max_shard_mb=0.001)
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    shard = data["weight_map"][key]
    shutil.copy(tmp_path / "ckpt" / shard, tmp_path / "outside.safetensors")
    data["weight_map"] = {k: ("../outside.safetensors" if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(UnsafePathError, match=r"\.\./outside\.safetensors"):
        headmods.load(tmp_path / "ckpt", model=native())


def test_symlinked_weights_leaving_the_folder_are_refused(ckpt, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        headmods.load(ckpt, model=native())


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    model = tiny_llama()
    headmods.swap(model, "mha")
    folder = tmp_path_factory.mktemp("llama") / "ckpt"
    headmods.save(model, folder)
    return folder


@pytest.mark.parametrize("name", ["../../victim.txt", "ABSOLUTE", "SYMLINK"])
def test_export_never_writes_outside_its_destination(llama_ckpt, tmp_path, name):
    src = shutil.copytree(llama_ckpt, tmp_path / "x" / "y" / "ckpt")
    (tmp_path / "x" / "victim.txt").write_text("attacker")  # what ckpt/../../victim.txt reads
    victim = tmp_path / "p" / "victim.txt"  # what <dest tmp>/../../victim.txt would overwrite
    victim.parent.mkdir()
    victim.write_text("precious")
    if name == "ABSOLUTE":
        name = str(victim)
    elif name == "SYMLINK":
        (src / "tokenizer.json").symlink_to(tmp_path / "x" / "victim.txt")
        name = "tokenizer.json"
    edit(src, lambda m: m.update(tokenizer_files=[name]))
    with pytest.raises(UnsafePathError, match="tokenizer_files"):
        headmods.export(src, tmp_path / "p" / "q" / "hf")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "p" / "q").exists() or not any((tmp_path / "p" / "q").iterdir())


def test_export_command_refuses_a_traversing_name_in_one_line(llama_ckpt, tmp_path, capsys):
    from headmods.cli import main

    src = shutil.copytree(llama_ckpt, tmp_path / "x" / "y" / "ckpt")
    victim = tmp_path / "p" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    edit(src, lambda m: m.update(tokenizer_files=["../../victim.txt"]))
    (tmp_path / "x" / "victim.txt").write_text("attacker")
    assert main(["export", "--ckpt", str(src), "--out", str(tmp_path / "p" / "q" / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer_files" in err[0] and err[0].startswith("headmods export: error:")
    assert victim.read_text() == "precious"


# -- overwrite ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["plain-folder", "checkpoint-plus-notes"])
def test_overwrite_refuses_folders_holding_user_files(tmp_path, llama_ckpt, with_checkpoint):
    dest = tmp_path / "dest"
    if with_checkpoint:
        headmods.save(native(), dest)
    else:
        dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"refusing to overwrite .*dest.*notes\.txt"):
        headmods.save(native(prune=True), dest, overwrite=True)
    with pytest.raises(OutputExistsError, match=r"refusing to overwrite .*dest.*notes\.txt"):
        headmods.export(llama_ckpt, dest, overwrite=True)
    assert (dest / "notes.txt").read_text() == "mine"
    if with_checkpoint:
        assert same_state(headmods.load(dest, model=native()), native())


def test_overwrite_replaces_headmods_and_hf_folders(tmp_path, llama_ckpt):
    headmods.export(llama_ckpt, tmp_path / "hf")
    headmods.save(native(prune=True), tmp_path / "hf", overwrite=True)  # an HF folder may be replaced
    headmods.export(llama_ckpt, tmp_path / "hf", overwrite=True)  # and a headmods one
    assert not (tmp_path / "hf" / MANIFEST).exists() and (tmp_path / "hf" / "config.json").is_file()


# -- crashes -----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch, headmods
    from headmods.io import checkpoint
    folder, point = sys.argv[1], sys.argv[2]
    torch.manual_seed(1)
    model = torch.nn.Sequential(headmods.MultiHeadAttention(16, 4, num_kv_heads=2, batch_first=True, rope_theta=1e4))
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if point == "writing":  # the weights are in the temporary folder; the card is next
        checkpoint.model_card = die
    else:  # the old folder is renamed away; the new one is not in place yet
        real = os.replace
        os.replace = lambda src, dst: die() if ".tmp-" in os.fspath(src) else real(src, dst)
    headmods.save(model, folder, overwrite=True)
""")


def killed_save(folder, point):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), point], env=env, cwd=os.getcwd(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("point", ["writing", "between-renames"])
def test_a_killed_save_leaves_a_loadable_checkpoint_and_no_litter(ckpt, point):
    killed_save(ckpt, point)
    assert [p.name for p in ckpt.parent.iterdir() if ".tmp-" in p.name]  # the dead writer's leftovers
    loaded = headmods.load(ckpt, model=native())  # the previous checkpoint, complete
    assert same_state(loaded, native(prune=True))
    assert headmods.io.read_manifest(ckpt)["layers"]["0"]["structure"]["kept_heads"] == [0, 1, 2]
    headmods.save(native(), ckpt, overwrite=True)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]
    assert same_state(headmods.load(ckpt, model=native()), native())


def test_a_live_writers_temporary_folder_is_kept_and_a_dead_ones_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_tmp = tmp_path / f".ckpt.tmp-{os.getppid()}-0000aaaa"
    dead_tmp = tmp_path / f".ckpt.tmp-{int(dead.stdout)}-0000bbbb"
    for p in (live_tmp, dead_tmp):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    headmods.save(native(), tmp_path / "ckpt")
    assert live_tmp.is_dir() and not dead_tmp.exists()


def test_write_atomic_removes_dead_writers_temporary_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".report.md.{int(dead.stdout)}.0123abcd.tmp"
    stale.write_bytes(b"half")
    write_atomic(tmp_path / "report.md", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    from headmods.recipes.plots import write_atomic as moved

    assert moved is write_atomic


# -- malformed manifests -----------------------------------------------------------------------

def _set(*keys, value=None, delete=False):
    def change(m):
        for k in keys[:-1]:
            m = m[k]
        if delete:
            del m[keys[-1]]
        else:
            m[keys[-1]] = value
    return change


MALFORMED = [
    (_set("schema_version", value="1"), r"schema_version must be an int in \[1, 1\], got '1'"),
    (_set("schema_version", value=True), r"schema_version must be an int in \[1, 1\], got True"),
    (_set("schema_version", value=0), r"schema_version must be an int in \[1, 1\], got 0"),
    (_set("dtype", value="float99"), r"dtype must be null or one of \['float32', .*got 'float99'"),
    (_set("layers", value=[]), r"layers must be a JSON object, got \[\]"),
    (_set("layers", "0", "host", delete=True), r"layers\.0\.host must be a string, got nothing"),
    (_set("layers", "0", "variant", value="nope"), r"layers\.0\.variant must be one of \[.*'mha'.*got 'nope'"),
    (_set("layers", "0", "config", value=[1]), r"layers\.0\.config must be a JSON object, got \[1\]"),
    (_set("layers", "0", "structure", "num_heads", value="3"), r"layers\.0\.structure\.num_heads must be an int"),
    (_set("layers", "0", "structure", "kept_heads", value="all"), r"layers\.0\.structure\.kept_heads must be null"),
    (_set("layers", "0", "structure", "num_kv_heads", value=1),
     r"layers\.0\.structure\.num_kv_heads must be 2 as layers\.0\.config says, got 1"),
    (_set("layers", "0", "config", "num_heads", value=None), r"layer '0' in headmods.json is invalid: layers\.0\.config"),
    (_set("host", value="torch"), r"host must be a JSON object, got 'torch'"),
    (_set("host", "kind", value="onnx"), r"host\.kind must be 'hf' or 'torch', got 'onnx'"),
    (_set("weights", "files", value="model.safetensors"), r"weights\.files must be a non-empty list"),
    (_set("weights", "format", value="pickle"), r"weights\.format must be 'safetensors', got 'pickle'"),
    (_set("weights", "aliases", value=["a"]), r"weights\.aliases must be a JSON object"),
    (_set("weights", "aliases", value={"0.x": 3}), r"weights\.aliases\.0\.x must be a non-empty tensor name"),
    (_set("tokenizer_files", value="vocab.txt"), r"tokenizer_files must be a list of file names"),
    (_set("provenance", value=[]), r"provenance must be a JSON object"),
    (_set("headmods_version", value=3), r"headmods_version must be a non-empty string, got 3"),
]


@pytest.mark.parametrize("change,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_manifest_names_the_field(ckpt, change, message):
    edit(ckpt, change)
    with pytest.raises(CheckpointError, match=message):
        headmods.load(ckpt, model=native())


def test_edited_structure_or_dtype_is_refused(tmp_path):
    torch.manual_seed(0)
    headmods.save(nn.Sequential(headmods.MultiHeadAttention(24, 4)), tmp_path / "ckpt")  # 4 heads of 6

    def swap_heads(m):  # 6 heads of 4: every weight keeps its shape
        entry = m["layers"]["0"]
        for part in ("config", "structure"):
            entry[part].update(num_heads=6, num_kv_heads=6, head_dim=4)

    edit(tmp_path / "ckpt", swap_heads)
    with pytest.raises(CheckpointError, match=r"layers\.0\.structure\.head_dim: the manifest says 4, the weights "
                                              r"file was saved with 6"):
        headmods.load(tmp_path / "ckpt", model=nn.Sequential(headmods.MultiHeadAttention(24, 4)))
    headmods.save(native(), tmp_path / "d")
    edit(tmp_path / "d", _set("dtype", value="float16"))
    with pytest.raises(CheckpointError, match=r"dtype: the manifest says 'float16', the weights file was saved "
                                              r"with 'float32'"):
        headmods.load(tmp_path / "d", model=native())


def test_checkpoints_without_recorded_structure_still_load_and_check_dtype(ckpt):
    file = ckpt / "model.safetensors"
    save_file(load_file(file), file, metadata={"format": "pt"})  # as an older headmods wrote it
    assert same_state(headmods.load(ckpt, model=native()), native(prune=True))
    edit(ckpt, _set("dtype", value="bfloat16"))
    with pytest.raises(CheckpointError, match=r"dtype: the manifest says 'bfloat16', .*\['float32'\]"):
        headmods.load(ckpt, model=native())


# -- any edit: the same model or a HeadmodsError -----------------------------------------------

def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["mha", "moh", "float16", "hf", "torch", "native", "hf_bert", "../x", "model.safetensors"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_edit_loads_the_same_model_or_raises_a_headmods_error(base, tmp_path, data):
    original = json.loads((base / MANIFEST).read_text())
    manifest = copy.deepcopy(original)
    path = data.draw(st.sampled_from(list(_paths(manifest))[1:]), label="field")
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    folder = Path(shutil.copytree(base, tempfile.mkdtemp(dir=tmp_path), dirs_exist_ok=True))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    try:
        loaded = headmods.load(folder, model=native())
    except HeadmodsError:
        return
    assert same_state(loaded, native(prune=True)), path
    assert loaded[0].config == native(prune=True)[0].config, path


@pytest.mark.parametrize("cls", ["NoSuchModel", "__version__", "AutoConfig"])
def test_hf_host_class_must_name_a_transformers_model(llama_ckpt, tmp_path, cls):
    folder = shutil.copytree(llama_ckpt, tmp_path / "ckpt")
    edit(folder, _set("host", "class", value=cls))
    with pytest.raises(CheckpointError, match=rf"host\.class .*must name a transformers model class, got '{cls}'"):
        headmods.load(folder)


def test_hf_config_that_does_not_build_is_a_checkpoint_error(llama_ckpt, tmp_path):
    folder = shutil.copytree(llama_ckpt, tmp_path / "ckpt")
    (folder / "config.json").write_text(json.dumps({"hidden_size": "wide"}))
    with pytest.raises(CheckpointError, match=r"cannot build LlamaForCausalLM from .*config\.json"):
        headmods.load(folder)


@pytest.fixture(scope="module")
def llama_ref(llama_ckpt):
    return headmods.load(llama_ckpt)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_edit_of_an_hf_checkpoint_loads_the_same_model_or_raises(llama_ckpt, llama_ref, tmp_path,
                                                                             data):
    manifest = json.loads((llama_ckpt / MANIFEST).read_text())
    path = data.draw(st.sampled_from(list(_paths(manifest))[1:]), label="field")
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    folder = Path(shutil.copytree(llama_ckpt, tempfile.mkdtemp(dir=tmp_path), dirs_exist_ok=True))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    try:
        loaded = headmods.load(folder)
    except HeadmodsError:
        return
    assert same_state(loaded, llama_ref), path


# -- truncated weight files --------------------------------------------------------------------

def test_truncated_gguf_is_named_as_truncated(tmp_path):
    source = headmods.convert.resolve_source("smollm2-135m").path
    copy_ = tmp_path / "cut.gguf"
    with open(source, "rb") as fh:
        copy_.write_bytes(fh.read(3_000_000))
    with pytest.raises(CorruptFileError, match=rf"{copy_}.*\(3000000 bytes\) is truncated or corrupt"):
        headmods.convert.load_gguf_model(copy_)


def test_truncated_safetensors_is_a_corrupt_file_error(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        headmods.load(ckpt, model=native())
