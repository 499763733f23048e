"""Timing and memory harness: ratios of callables measured in one process.

The machines this project runs on are shared and noisy, so a benchmark here never compares
absolute times across processes. ``compare`` runs every candidate once per round, alternating
the order (reversed every other round) after a warm-up, and reports each candidate's *median
per-round ratio* against a baseline. Torch's thread count is fixed for the duration.

Peak memory is the high-water mark of one extra call: on CUDA from the allocator's peak
statistics; on Linux CPUs from the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) above what was resident before the call, after ``malloc_trim``
has returned freed heap pages, so memory reused from earlier calls is counted again. The CPU
figure is an upper bound on live tensor memory (a freed block stays resident until the
allocator returns it). Elsewhere it is None.

Example:
    >>> import torch
    >>> x = torch.randn(256, 256)
    >>> res = compare({"mm": lambda: x @ x, "mm2": lambda: (x @ x) @ x}, baseline="mm", rounds=3)
    >>> sorted(res.times)
    ['mm', 'mm2']
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["BenchResult", "compare", "peak_memory_mb", "bench_variant", "bench_checkpoint"]


@dataclass
class BenchResult:
    """Per-round times (seconds) of each candidate, measured alternately in one process."""

    baseline: str
    times: dict[str, list[float]]
    peak_mb: dict[str, float | None] = field(default_factory=dict)
    threads: int = 0

    def median_ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.times[name])

    def ratio(self, name: str, against: str | None = None) -> float:
        """Median over rounds of ``time(name) / time(against)`` (default: the baseline)."""
        ref = self.times[against or self.baseline]
        return statistics.median(a / b for a, b in zip(self.times[name], ref))

    def to_markdown(self) -> str:
        """A table: candidate, median time, ratio against the baseline, peak memory."""
        lines = [f"| candidate | median ms | ratio vs {self.baseline} | peak MB |", "|---|---:|---:|---:|"]
        for name in self.times:
            peak = self.peak_mb.get(name)
            lines.append(f"| {name} | {self.median_ms(name):.2f} | {self.ratio(name):.3f} | "
                         f"{'n/a' if peak is None else f'{peak:.1f}'} |")
        return "\n".join(lines)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(
    candidates: Mapping[str, Callable[[], object]],
    *,
    baseline: str | None = None,
    warmup: int = 2,
    rounds: int = 7,
    threads: int | None = None,
    device: str = "cpu",
    memory: bool = True,
) -> BenchResult:
    """Time ``candidates`` alternately in this process; ratios are against ``baseline`` (default: the first).

    Args:
        candidates: name -> zero-argument callable (wrap it in ``torch.no_grad()`` yourself).
        warmup: untimed rounds first.
        rounds: timed rounds; the result keeps every round.
        threads: ``torch.set_num_threads`` while timing (restored afterwards); None keeps it.
        device: ``"cpu"`` or a CUDA device; CUDA work is synchronized around each call.
        memory: also measure each candidate's peak memory in one extra call.
    """
    if not candidates:
        raise ValueError("compare needs at least one candidate")
    names = list(candidates)
    baseline = names[0] if baseline is None else baseline
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not a candidate; candidates: {names}")
    if warmup < 0 or rounds < 1:
        raise ValueError(f"need warmup >= 0 and rounds >= 1, got warmup={warmup}, rounds={rounds}")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(warmup + rounds):
            for name in (names if r % 2 == 0 else reversed(names)):
                _sync(device)
                start = time.perf_counter()
                candidates[name]()
                _sync(device)
                if r >= warmup:
                    times[name].append(time.perf_counter() - start)
        peaks = {n: peak_memory_mb(candidates[n], device=device) for n in names} if memory else {}
        return BenchResult(baseline, times, peaks, torch.get_num_threads())
    finally:
        torch.set_num_threads(saved_threads)


def peak_memory_mb(fn: Callable[[], object], *, device: str = "cpu") -> float | None:
    """Extra memory at the peak of one call of ``fn``, in MB (None where it cannot be measured)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) / 1024
    except OSError:
        return None


def _malloc_trim() -> None:
    """Return free heap pages to the OS (glibc), so the next call's touches show in the RSS."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _rows(result: BenchResult, params: dict[str, int], tokens: int) -> str:
    lines = ["| model | parameters | median ms | ratio | tokens/s | peak MB |", "|---|---:|---:|---:|---:|---:|"]
    for name in result.times:
        ms, peak = result.median_ms(name), result.peak_mb.get(name)
        lines.append(f"| {name} | {params[name]:,} | {ms:.2f} | {result.ratio(name):.3f} | {tokens / ms * 1e3:,.0f} | "
                     f"{'n/a' if peak is None else f'{peak:.1f}'} |")
    return "\n".join(lines)


def bench_variant(variant: str, *, embed_dim: int = 768, num_heads: int = 12, num_kv_heads: int | None = None,
                  batch: int = 4, seq_len: int = 512, rounds: int = 5, causal: bool = False) -> str:
    """A markdown table: ``variant`` against SDPA multi-head attention (headmods ``mha``) at one shape."""
    from .registry import create

    x = torch.randn(batch, seq_len, embed_dim)
    layers = {"mha (SDPA baseline)": create("mha", embed_dim, num_heads, batch_first=True).eval()}
    if variant != "mha" or num_kv_heads is not None:
        layers[variant] = create(variant, embed_dim, num_heads, num_kv_heads=num_kv_heads, batch_first=True).eval()
    runs = {name: (lambda m=m: m(x, is_causal=causal)) for name, m in layers.items()}
    with torch.no_grad():
        result = compare(runs, rounds=rounds, warmup=1)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in layers.items()}
    head = f"forward, x {tuple(x.shape)}, {'causal' if causal else 'non-causal'}, {result.threads} threads\n\n"
    return head + _rows(result, params, batch * seq_len)


def bench_checkpoint(folder: str, *, batch: int = 4, seq_len: int = 512, rounds: int = 5) -> str:
    """A markdown table for a headmods folder: parameters, forward latency, tokens/s, peak memory."""
    from .io import load

    model = load(folder)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError(f"{folder}: bench --ckpt needs a transformers host with a vocabulary")
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    name = Path(folder).name
    with torch.no_grad():
        result = compare({name: lambda: model(input_ids=ids)}, rounds=rounds, warmup=1)
    head = f"forward of {folder}, input ids {tuple(ids.shape)}, {result.threads} threads\n\n"
    return head + _rows(result, {name: sum(p.numel() for p in model.parameters())}, batch * seq_len)
