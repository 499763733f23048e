"""Fixtures for recipe tests: a tiny BERT checkpoint (MiniLM's tokenizer, 2 layers of width 32)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    from headmods.convert import resolve_source

    minilm = resolve_source("minilm").path
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy2(minilm / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def write_tiny_recipe(tiny_bert_dir: Path):
    """``write(path, output_dir)``: a small finetune recipe for the tiny BERT on 96 BBC articles."""

    def write(path: Path, output_dir: Path) -> Path:
        text = f"""
recipe: finetune
output_dir: {output_dir}
model: {{source: {tiny_bert_dir}, variant: mha, task: classification}}
data: {{kind: bbc, limit: 96, max_length: 32, val_fraction: 0.25, seed: 3, batch_size: 8, eval_batch_size: 16}}
train: {{max_steps: 10, lr: 1.0e-3, checkpoint_every_n_steps: 3, log_every_n_steps: 1, progress_bar: false}}
bench: {{rounds: 0}}
"""
        path.write_text(text)
        return path

    return write


@pytest.fixture
def tiny_recipe(tmp_path: Path, write_tiny_recipe):
    """Write a small finetune recipe (output_dir ``tmp_path / 'run'``); returns its path."""

    def write(name: str = "tiny.yaml", **extra: str) -> Path:
        return write_tiny_recipe(tmp_path / name, tmp_path / "run")

    return write
