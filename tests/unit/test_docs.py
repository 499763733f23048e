"""Docs live inside the repository: every file a tracked text file cites must exist in it.

The scan covers the tracked files under ``headmods/``, ``benchmarks/``, ``tests/``, ``recipes/``,
``docs/`` and ``Makefile``, ``pyproject.toml``, ``README.md``. It fails on

- a citation of design notes that never shipped (``FORBIDDEN`` below: a path token containing one
  of them must name a file of the repository; a section sign after the bare name is always wrong);
- a repository path (``docs/...``, ``benchmarks/...``, ``recipes/...``, ...) that does not exist;
- a relative markdown link in ``docs/`` whose target does not exist.

This file is not scanned: its pattern list names exactly what it forbids.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SELF = pathlib.Path(__file__).resolve().relative_to(ROOT).as_posix()
SCANNED_DIRS = ("headmods/", "benchmarks/", "tests/", "recipes/", "docs/")
SCANNED_FILES = ("Makefile", "pyproject.toml", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".cfg", ".ini", ""}

# Names of notes kept beside the project while it was built; users never had them.
FORBIDDEN = ("spec/", "DESIGN.md", "ENVIRONMENT.md", "performance.md", "algorithms.md", "ecosystem.md")
# Section citations of those notes ("DESIGN §2", "ecosystem §2.3"): never a file of the repository.
FORBIDDEN_SECTIONS = re.compile(r"\b(DESIGN|ecosystem|ENVIRONMENT|algorithms|performance)\s*§")
PATH_TOKEN = re.compile(r"[\w.\-/]*(?:%s)[\w.\-/]*" % "|".join(re.escape(f) for f in FORBIDDEN))
# Paths into the repository's own folders, with a file suffix.
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|recipes|tests|headmods)/[\w.\-/]*\.(?:md|py|yaml|png))\b")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):  # no git: every file on disk
        names = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return sorted(n for n in names
                  if (n.startswith(SCANNED_DIRS) or n in SCANNED_FILES) and n != SELF
                  and pathlib.PurePosixPath(n).suffix in TEXT_SUFFIXES and (ROOT / n).is_file())


def exists(path: str) -> bool:
    return (ROOT / path.rstrip("./")).exists()


def broken_citations(name: str, text: str) -> list[str]:
    """``file:line: reason`` for each citation in ``text`` (the file ``name``) that leads nowhere."""
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{lineno}"
        if m := FORBIDDEN_SECTIONS.search(line):
            problems.append(f"{where}: cites a section of a document that is not in the repository: {m.group(0)!r}")
        for token in PATH_TOKEN.findall(line):
            if not exists(token) and not (name.startswith("docs/") and (ROOT / name).parent.joinpath(token).exists()):
                problems.append(f"{where}: cites a file that is not in the repository: {token!r}")
        for path in REPO_PATH.findall(line):
            if "*" not in path and "<" not in path and not exists(path):
                problems.append(f"{where}: path does not exist: {path!r}")
        if name.endswith(".md"):
            for target in MD_LINK.findall(line):
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not (ROOT / name).parent.joinpath(target).exists():
                    problems.append(f"{where}: markdown link target does not exist: {target!r}")
    return problems


def test_every_cited_file_exists():
    problems = []
    for name in tracked_files():
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        problems += broken_citations(name, text)
    assert not problems, "citations of files that are not in the repository:\n" + "\n".join(problems)


def test_docs_pages_exist():
    pages = ["docs/README.md", "docs/design.md"] + [f"docs/methods/{m}.md" for m in
                                                     ("mha", "moh", "dha", "shrp", "cmha", "rcmha", "longheads")]
    assert [p for p in pages if not (ROOT / p).is_file()] == []


@pytest.mark.parametrize("line, bad", [
    ("Spec: ``spec/algorithms.md`` §6.", True),
    ("Contract (DESIGN §2): MHA's constructor prefix", True),
    ("(mechanism A of ecosystem §2.3.3)", True),
    ("see ENVIRONMENT.md", True),
    ("(``performance.md`` §3)", True),
    ("see docs/methods/nonexistent.md", True),
    ("figures in benchmarks/results/no_such_file.md", True),
    ("[design](missing.md)", True),
    ("see docs/README.md and benchmarks/results/mha_cpu.md", False),
    ("the spec's choices", False),
])
def test_the_check_catches_dead_citations(line, bad):
    assert bool(broken_citations("docs/x.md", line)) is bad
