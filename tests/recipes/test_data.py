"""headmods.recipes data: local readers, seeded splits, tokenized rows, the step-resumable stream."""

import json
from collections import Counter

import datasets
import pytest
import torch

from headmods.convert import load_tokenizer, resolve_source
from headmods.recipes import (
    Collator,
    DataConfig,
    RecipeDataModule,
    StepStream,
    bbc_folder,
    load_local,
    passkey_samples,
    pydoc_texts,
    read_label_folder,
)


class WordTokenizer:
    """A stand-in tokenizer: ``"w17"`` -> id 27 (number + 10); pad 0, EOS 1. Ids name their document."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, texts, truncation=False, max_length=None, add_special_tokens=True):
        ids = [[int(word[1:]) + 10 for word in text.split()] for text in texts]
        if truncation:
            ids = [row[:max_length] for row in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}


@pytest.fixture(scope="module")
def minilm_tok():
    return load_tokenizer(resolve_source("minilm"))


def _label_tree(root, counts):
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i:03d}.txt").write_text(f"{label} article number {i} about {label} things.\n")
    return root


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _word_docs(tmp_path, n_docs=40, classes=2):
    """JSON Lines whose document i is ``"wi wi ..."`` (3 + i % 7 words), label i % classes."""
    rows = [{"text": " ".join([f"w{i}"] * (3 + i % 7)), "label": i % classes} for i in range(n_docs)]
    return str(_jsonl(tmp_path / "docs.jsonl", rows))


def _dm(tmp_path, task="classification", tokenizer=None, **cfg):
    cfg.setdefault("kind", "json")
    if cfg["kind"] == "json":
        cfg.setdefault("path", _word_docs(tmp_path))
    return RecipeDataModule(DataConfig(**cfg), tokenizer or WordTokenizer(), task=task, cache_dir=tmp_path / "cache")


def _docs(rows):
    """Document ids present in tokenized rows (WordTokenizer ids minus 10; EOS/pad dropped)."""
    return {t - 10 for row in rows for t in row["input_ids"] if t >= 10}


# ---- readers ---------------------------------------------------------------------------------
def test_read_label_folder_sorted_labels_and_latin1_fallback(tmp_path):
    root = _label_tree(tmp_path / "data", {"sport": 3, "arts": 2})
    (root / "arts" / "zz.txt").write_bytes("caf\xe9 society".encode("latin-1"))
    (root / "arts" / "notes.md").write_text("ignored")
    ds = read_label_folder(root)
    assert ds.features["label"].names == ["arts", "sport"]
    assert list(ds["label"]) == [0, 0, 0, 1, 1, 1]
    assert ds[2]["text"] == "café society" and ds[0]["text"].startswith("arts article number 0")
    assert len(read_label_folder(root, limit=1)) == 2


def test_label_folder_without_txt_files_names_the_folder(tmp_path):
    root = _label_tree(tmp_path / "data", {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "readme.md").write_text("no articles")
    with pytest.raises(ValueError, match=r"data/b holds no \.txt files"):
        read_label_folder(root)


def test_missing_paths_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_label_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_local("json", tmp_path / "nope.jsonl", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\*\.txt"):
        load_local("text", str(tmp_path / "*.txt"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        _dm(tmp_path, task="causal-lm", kind="text", path=str(tmp_path / "gone.txt")).setup()


@pytest.mark.parametrize("fmt", ["jsonl", "json-array", "parquet"])
def test_json_and_parquet_with_custom_fields_and_string_labels(tmp_path, fmt):
    rows = [{"body": f"text {i}", "topic": ["sport", "arts"][i % 2], "extra": i} for i in range(6)]
    rows.append({"body": "", "topic": "arts", "extra": 9})  # empty text: dropped
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "jsonl":
        path = _jsonl(tmp_path / "d.jsonl", rows)
    else:
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    kind = "parquet" if fmt == "parquet" else "json"
    ds = load_local(kind, path, text_field="body", label_field="topic", cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text", "label"] and len(ds) == 6
    assert ds.features["label"].names == ["arts", "sport"]
    assert ds[0] == {"text": "text 0", "label": 1}
    assert list(load_local(kind, path, text_field="body", cache_dir=tmp_path / "cache").column_names) == ["text"]


def test_missing_text_or_label_field_lists_the_fields_present(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "x", "topic": 1}])
    with pytest.raises(ValueError, match=r"no text field 'text'.*\['body', 'topic'\]"):
        load_local("json", path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no label field 'label'.*\['body', 'topic'\]"):
        load_local("json", path, text_field="body", label_field="label", cache_dir=tmp_path)


def test_text_files_sample_by_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    (tmp_path / "b.txt").write_text("four\n")
    glob = str(tmp_path / "*.txt")
    by_line = load_local("text", glob, cache_dir=tmp_path / "c", sample_by="line")
    assert list(by_line["text"]) == ["one", "two", "three", "four"]
    by_para = load_local("text", glob, cache_dir=tmp_path / "c", sample_by="paragraph")
    assert list(by_para["text"]) == ["one\ntwo", "three", "four"]
    assert len(load_local("text", tmp_path, cache_dir=tmp_path / "c")) == 2  # a folder: its .txt files


def test_empty_dataset_and_unknown_kind(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty dataset"):
        load_local("text", tmp_path / "blank.txt", cache_dir=tmp_path / "c", sample_by="line")
    with pytest.raises(ValueError, match=r"unknown data kind 'csv'.*'text', 'json'"):
        load_local("csv", tmp_path / "blank.txt", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown data kind 'csv'.*'bbc'"):
        DataConfig("csv", "x.csv")


def test_pydoc_passkey_and_real_bbc():
    texts = pydoc_texts()
    assert len(texts) == 79 and all(t.strip() for t in texts) and sum(map(len, texts)) > 400_000
    rows = passkey_samples(5, filler_sentences=30, seed=3)
    assert rows == passkey_samples(5, filler_sentences=30, seed=3) != passkey_samples(5, filler_sentences=30, seed=4)
    for row in rows:
        assert row["answer"].isdigit() and len(row["answer"]) == 5
        assert f"The pass key is {row['answer']}. Remember it." in row["text"]
        assert row["text"].endswith("What is the pass key? The pass key is") and 0 <= row["depth"] <= 1
    ds = read_label_folder(bbc_folder())
    names = ds.features["label"].names
    assert len(ds) == 2225 and len(names) == 5
    counts = {names[k]: v for k, v in Counter(ds["label"]).items()}
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


# ---- config ----------------------------------------------------------------------------------
def test_data_config_round_trip_and_misspelled_key():
    cfg = DataConfig("json", "d.jsonl", limit=10, seed=3)
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"\['batchsize'\].*'batch_size'"):
        DataConfig.from_dict({"kind": "bbc", "batchsize": 4})
    with pytest.raises(ValueError, match="needs a path"):
        DataConfig("folder")
    with pytest.raises(ValueError, match="takes no path"):
        DataConfig("pydoc", "x")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True])
def test_val_fraction_must_lie_in_open_unit_interval(fraction):
    with pytest.raises(ValueError, match=f"val_fraction.*{fraction!r}"):
        DataConfig("bbc", val_fraction=fraction)


def test_bad_task_and_unlabelled_classification(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        _dm(tmp_path, task="regression")
    with pytest.raises(ValueError, match="'pydoc' has no labels"):
        RecipeDataModule(DataConfig("pydoc"), WordTokenizer(), task="classification")


# ---- splits and rows -------------------------------------------------------------------------
def test_stratified_split_is_seeded_disjoint_and_stratified(tmp_path):
    def split(seed):
        dm = _dm(tmp_path, seed=seed, max_length=64)
        dm.setup()
        dm.setup()  # idempotent
        return _docs(dm.train_dataset), _docs(dm.val_dataset), dm.describe()

    train, val, info = split(0)
    assert train.isdisjoint(val) and train | val == set(range(40))
    assert info["label_counts"] == {"train": {"0": 16, "1": 16}, "val": {"0": 4, "1": 4}}
    assert json.loads(json.dumps(info))["val_size"] == 8
    assert split(0)[:2] == (train, val)
    assert split(1)[1] != val


def test_limit_is_a_seeded_subset(tmp_path):
    dm, again = _dm(tmp_path, limit=20, seed=5), _dm(tmp_path, limit=20, seed=5)
    dm.setup()
    again.setup()
    docs = _docs(dm.train_dataset) | _docs(dm.val_dataset)
    assert len(docs) == 20 and docs == _docs(again.train_dataset) | _docs(again.val_dataset)


def test_too_few_samples_for_a_split(tmp_path):
    rows = [{"text": "w1", "label": 0}, {"text": "w2", "label": 0}, {"text": "w3", "label": 1}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match="1 examples of label '1'"):
        _dm(tmp_path, path=str(path)).setup()
    with pytest.raises(ValueError, match="1 documents"):
        _dm(tmp_path, task="causal-lm", path=str(path), limit=1).setup()
    with pytest.raises(ValueError, match="32 samples give no full global batch of batch_size 64"):
        _dm(tmp_path, batch_size=64).train_dataloader()
    with pytest.raises(ValueError, match="num_samples <= 32"):
        _dm(tmp_path).calibration_batches(33)


def test_classification_batches_pad_per_batch_with_minilm(tmp_path, minilm_tok):
    root = _label_tree(tmp_path / "data", {"a": 9, "b": 10})
    (root / "a" / "long.txt").write_text("a very long article " * 40)
    dm = _dm(tmp_path, tokenizer=minilm_tok, kind="folder", path=str(root), max_length=24, batch_size=4,
             eval_batch_size=8)
    assert dm.num_labels == 2 and dm.label_names == ["a", "b"]
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["labels"].shape == (4,)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max() <= 24 and batch["input_ids"][:, 0].eq(101).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == minilm_tok.pad_token_id).all()
    assert max(len(row["input_ids"]) for row in dm.train_dataset) == 24  # truncated
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape[0] == 4 and train["input_ids"].shape[1] <= 24


def test_lm_blocks_have_max_length_and_never_mix_splits(tmp_path, minilm_tok):
    dm = _dm(tmp_path, task="causal-lm", max_length=8, batch_size=2)
    assert dm.num_labels is None  # runs setup()
    for rows in (dm.train_dataset, dm.val_dataset):
        assert all(len(r["input_ids"]) == 8 and r["labels"] == r["input_ids"] for r in rows)
    assert _docs(dm.train_dataset).isdisjoint(_docs(dm.val_dataset))
    assert any(1 in r["input_ids"] for r in dm.train_dataset)  # EOS between documents
    tokens = dm.describe()["tokens"]["train"]
    assert len(dm.train_dataset) == tokens // 8  # remainder dropped
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (2, 8)
    (tmp_path / "prose.txt").write_text("".join(f"Paragraph {i} talks about attention heads.\n\n" for i in range(20)))
    real = _dm(tmp_path, tokenizer=minilm_tok, task="causal-lm", kind="text", path=str(tmp_path / "prose.txt"),
               sample_by="paragraph", max_length=16)
    real.setup()
    assert {len(r["input_ids"]) for r in real.val_dataset} == {16}


def test_calibration_batches_follow_the_epoch_zero_order(tmp_path):
    dm = _dm(tmp_path, batch_size=4)
    calib = dm.calibration_batches(10)
    assert [b["input_ids"].shape[0] for b in calib] == [4, 4, 2]
    stream = iter(dm.train_dataloader())
    for got in calib[:2]:
        assert torch.equal(got["labels"], next(stream)["labels"])


# ---- the step stream -------------------------------------------------------------------------
ROWS = [{"input_ids": [i, i], "labels": [i, i]} for i in range(23)]


def _stream(start=0, **kw):
    size = kw.pop("batch_size", 4)
    return StepStream(ROWS, batch_size=size, seed=7, collate_fn=Collator(0), start_fn=lambda: start, **kw)


def _ids(batches):
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_stream_covers_each_epoch_once_and_reshuffles():
    epochs = [_ids(_stream(start=e * 5)) for e in range(3)]  # 23 // 4 = 5 batches per epoch
    for batches in epochs:
        seen = [i for batch in batches for i in batch]
        assert len(batches) == 5 and len(seen) == 20 == len(set(seen))
    assert epochs[0] != epochs[1] != epochs[2]
    assert len(_stream()) == 5


@pytest.mark.parametrize("k", [0, 3, 5, 9, 12])
def test_stream_started_at_k_replays_the_uninterrupted_sequence(k):
    full = [b for e in range(3) for b in _ids(_stream(start=e * 5))]
    assert _ids(_stream(start=k)) == full[k : (k // 5 + 1) * 5]


def test_stream_ranks_get_disjoint_samples():
    ranks = [_ids(_stream(start=2, batch_size=3, world_size=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 23 // 6 - 2
    flat = [set(i for batch in batches for i in batch) for batches in ranks]
    assert flat[0].isdisjoint(flat[1])
    with pytest.raises(ValueError, match="rank"):
        _stream(world_size=2, rank=2)


@pytest.mark.parametrize("batch_size,accumulate,max_steps,resumed", [(4, 2, 10, 14), (5, 4, 7, 12)])
def test_lightning_resume_mid_epoch_reproduces_the_uninterrupted_batches(tmp_path, batch_size, accumulate, max_steps,
                                                                          resumed):
    """Resume from the step-3 checkpoint of a run; (5, 4): 6 batches per epoch is no multiple of 4."""
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.trainer.current_epoch, batch_idx, batch["input_ids"][:, 0].tolist()))
            return self.w * batch["input_ids"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def run(ckpt=None):
        module = Recorder()
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
        trainer = lightning.Trainer(
            accelerator="cpu", devices=1, accumulate_grad_batches=accumulate, max_steps=max_steps, max_epochs=10,
            default_root_dir=tmp_path, logger=False, callbacks=[every], enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(module, datamodule=_dm(tmp_path, batch_size=batch_size), ckpt_path=ckpt)
        return module.seen

    full = run()
    tail = run(str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert len(tail) == resumed and tail[0][0] < tail[-1][0]  # mid-epoch start, crosses an epoch boundary
    assert tail == full[len(full) - resumed :]


@pytest.mark.parametrize("loss", ["answer", "all"])
def test_passkey_rows_keep_each_prompt_whole_and_score_the_answer(tmp_path, loss):
    from headmods.recipes.scratch import BPEFactory

    dm = _dm(tmp_path, task="causal-lm", tokenizer=BPEFactory(300), kind="passkey", passkey_samples=12,
             passkey_filler=8, max_length=160, passkey_loss=loss)
    dm.setup()
    tok = dm.tokenizer
    for row in dm.train_dataset:
        assert len(row["input_ids"]) == len(row["labels"]) == 160
        scored = [t for t in row["labels"] if t != -100]
        text = tok.decode([t for t in row["input_ids"] if t != dm.pad_id])
        assert text.startswith("The grass") or text.startswith("The pass key") or "pass key is" in text
        key = text.split("The pass key is ")[1][:5]
        assert text.rstrip().endswith(f"The pass key is {key}.")  # one whole prompt and its answer
        if loss == "answer":
            assert tok.decode(scored).strip() == f"{key}."
        else:
            assert scored == [t for t in row["input_ids"] if t != dm.pad_id][:len(scored)]
    with pytest.raises(ValueError, match="lower data.passkey_filler"):
        _dm(tmp_path, task="causal-lm", tokenizer=BPEFactory(300), kind="passkey", passkey_samples=4,
            passkey_filler=80, max_length=64).setup()
    with pytest.raises(ValueError, match="passkey_loss must be 'all' or 'answer'"):
        DataConfig("passkey", passkey_loss="key")
