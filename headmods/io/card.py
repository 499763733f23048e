"""The generated model card (README.md) of a headmods checkpoint."""

from __future__ import annotations

from typing import Any

__all__ = ["model_card"]


def model_card(manifest: dict[str, Any], extra: dict[str, Any], *, num_params: int) -> str:
    """Markdown: what the model is, where it came from, its per-layer structure, metrics, reports."""
    host, layers, prov = manifest["host"], manifest["layers"], manifest.get("provenance", {})
    variants = sorted({entry["variant"] for entry in layers.values()})
    lines = [
        f"# headmods checkpoint: {', '.join(variants) or 'no headmods layers'} in {host['class']}",
        "",
        f"- headmods {manifest['headmods_version']}, schema {manifest['schema_version']}",
        f"- host: {host['kind']} `{host['class']}`" + (f" (model_type `{host['model_type']}`)" if host.get("model_type") else ""),
        f"- parameters: {num_params:,}; dtype {manifest.get('dtype')}",
        f"- source: {prov.get('source') or 'not recorded'}",
    ]
    for name, digest in prov.get("source_sha256", {}).items():
        lines.append(f"  - sha256 `{name}`: `{digest}`")
    lines += ["", "Load it with `headmods.load(folder)` (safetensors + JSON, no pickle, no network).", "",
              "## Attention layers", "", "| layer | variant | replaced | heads | kv heads | head_dim | kept heads |",
              "|---|---|---|---:|---:|---:|---|"]
    for path, entry in layers.items():
        s = entry["structure"]
        kept = "all" if s["kept_heads"] is None else ",".join(map(str, s["kept_heads"]))
        lines.append(f"| `{path}` | {entry['variant']} | {entry['host']} | {s['num_heads']} | {s['num_kv_heads']} | "
                     f"{s['head_dim']} | {kept} |")
    if extra.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in extra["metrics"].items()]
    for title, body in extra.items():
        if title != "metrics" and isinstance(body, str):
            lines += ["", f"## {title.replace('_', ' ').capitalize()}", "", body]
    return "\n".join(lines) + "\n"
