"""The headmods checkpoint format: ``save``, ``load``, ``export``, written atomically and read defensively."""

from .checkpoint import MANIFEST, SCHEMA_VERSION, load, read_manifest, save
from .export import export, to_stock_hf

__all__ = ["MANIFEST", "SCHEMA_VERSION", "export", "load", "read_manifest", "save", "to_stock_hf"]
