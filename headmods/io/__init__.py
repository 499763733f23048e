"""The headmods checkpoint format: ``save``, ``load``, ``export`` (DESIGN §4)."""

from .checkpoint import MANIFEST, SCHEMA_VERSION, load, read_manifest, save
from .export import export, to_stock_hf

__all__ = ["MANIFEST", "SCHEMA_VERSION", "export", "load", "read_manifest", "save", "to_stock_hf"]
