"""The YAML recipes shipped with headmods (``recipes/`` in the repository, package data in wheels)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["recipes_dir", "list_recipes", "find_recipe"]


def recipes_dir() -> Path:
    import headmods

    return Path(headmods.__file__).parent / "_shipped" / "recipes"


def _summary(path: Path) -> str:
    """The first comment line after the command line(s) at the top of a recipe."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith("headmods "):
            return text
        if not line.startswith("#"):
            break
    return ""


def list_recipes() -> list[tuple[str, Path, str]]:
    """``(name, path, summary)`` for every shipped recipe, sorted by name."""
    return [(p.stem, p, _summary(p)) for p in sorted(recipes_dir().glob("*.yaml"))]


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A shipped recipe by name (``minilm_bbc_finetune``) or any existing YAML file path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    candidate = recipes_dir() / f"{name}.yaml"
    if candidate.is_file() and path.parent == Path("."):
        return candidate
    known = ", ".join(n for n, _, _ in list_recipes())
    raise FileNotFoundError(f"no recipe file {str(name_or_path)!r} and no shipped recipe named {name!r}; "
                            f"shipped: {known}")
