"""RCMHA and its ablations against SDPA MHA and a Transformer-XL-style RMHA: causal forward time and peak memory.

    .venv/bin/python benchmarks/bench_rcmha.py [--seq-len 1024 --rounds 9 --threads 2]

One causal forward of a whole layer (projections, convolutions, relative term, attention, W_O),
B=1, D=768, h=12 heads of 64, fp32 on CPU, no gradients. Candidates (all headmods unless said):

- MHA: :class:`headmods.MultiHeadAttention`, causal SDPA;
- RCMHA: convolutions (shared kernels, K=3) and relative terms (clipped, P = ``--max-relative-position``);
- MDHA: convolutions only (``relative=False``); RMHA: relative terms only (``conv=False``);
- Transformer-XL RMHA reference, written here in the way labml's ``RelativeMultiHeadAttention``
  (the module the official RCMHA code builds on) computes: ``(q + u)·kᵀ`` and ``q·Rᵀ`` over the
  whole ``2T``-row window of ``R`` as separate eager einsums, the shift-right trick to align
  offsets, an explicit causal mask, softmax and ``·v`` (no SDPA). Its output is checked against
  headmods RMHA with the same weights (``R`` rows mapped from labml's ``P - Δ`` to our ``P + Δ``).

Times: every candidate runs once per round, alternating order, in one process; ratios are medians
of per-round ratios against MHA (:func:`headmods.bench.compare`).

Peak memory: each candidate is measured in a fresh subprocess (this script with ``--measure``):
it builds the layer and input, runs one forward at 8 tokens so libraries finish their one-time
set-up, then measures one forward at full length with :func:`headmods.bench.peak_memory_mb`:
free heap goes back to the OS (``malloc_trim``), the kernel's peak resident set ``VmHWM`` is reset
to the current one (``/proc/self/clear_refs``), and the result is how far ``VmHWM`` rose above
``VmRSS`` during the forward. That is the extra resident memory at the peak of the forward, an
upper bound on its live tensors, independent of what other candidates left behind. (An earlier
version read ``getrusage``'s ``ru_maxrss``, which ``clear_refs`` does not reset: the peak of the
imports hid every forward and the column read 0.0.)
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import torch
from torch import Tensor, nn

import headmods
from headmods.bench import compare, peak_memory_mb

D, H = 768, 12


def shift_right(x: Tensor) -> Tensor:
    """labml's shift: row ``i`` of ``(..., n, m)`` moves ``i`` places right (what spills wraps into the next row)."""
    *lead, n, m = x.shape
    padded = torch.cat([x, x.new_zeros(*lead, n, 1)], dim=-1)  # (..., n, m + 1)
    return padded.view(*lead, m + 1, n)[..., :-1, :].reshape(*lead, n, m)


class XLRelativeAttention(nn.Module):
    """Transformer-XL RMHA as labml computes it (batch-first, no memory).

    Learned ``R (2P, h, d)``, ``b (2P, h)``, ``u (h, d)``; offset ``Δ`` reads row ``P - Δ``.
    """

    def __init__(self, embed_dim: int, num_heads: int, max_relative_position: int) -> None:
        super().__init__()
        self.h, self.d, self.P = num_heads, embed_dim // num_heads, max_relative_position
        self.q_proj, self.k_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.v_proj, self.o_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.u = nn.Parameter(torch.zeros(num_heads, self.d))
        self.R = nn.Parameter(torch.zeros(2 * self.P, num_heads, self.d))
        self.b = nn.Parameter(torch.zeros(2 * self.P, num_heads))

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d)  # (B, T, h, d)
        k = self.k_proj(x).view(B, T, self.h, self.d)
        v = self.v_proj(x).view(B, T, self.h, self.d)
        ac = torch.einsum("bihd,bjhd->bhij", q + self.u, k)  # (B, h, T, T)
        window = slice(self.P - T, self.P + T)  # keys then queries: 2T rows
        bd = torch.einsum("bihd,jhd->bhij", q, self.R[window]) + self.b[window].t()[None, :, None, :]  # (B, h, T, 2T)
        bd = shift_right(bd)[..., -T:]  # column j of row i: offset i - j
        scores = (ac + bd) / math.sqrt(self.d)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)  # (B, T, h, d)
        return self.o_proj(out.reshape(B, T, self.h * self.d))


def build(name: str, P: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "xl":
        layer = XLRelativeAttention(D, H, P)
        with torch.no_grad():
            for p in (layer.u, layer.R, layer.b):
                p.normal_(0, 0.1)
        return layer.eval()
    settings = {"mha": None, "rcmha": {}, "mdha": {"relative": False}, "rmha": {"conv": False}}[name]
    if settings is None:
        return headmods.MultiHeadAttention(D, H, batch_first=True).eval()
    layer = headmods.RCMHAttention(D, H, batch_first=True, conv_init="official", max_relative_position=P, **settings)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n in ("content_bias", "rel_key", "rel_bias"):
                p.normal_(0, 0.1)
    return layer.eval()


def forward(layer: nn.Module, x: Tensor) -> Tensor:
    return layer(x) if isinstance(layer, XLRelativeAttention) else layer(x, is_causal=True)[0]


def measure(name: str, T: int, P: int, threads: int) -> None:
    """Subprocess mode: print the peak resident-set growth (MB) of one forward of ``name``."""
    torch.set_num_threads(threads)
    layer, x = build(name, P), torch.randn(1, T, D)
    with torch.no_grad():
        forward(layer, x[:, :8])  # one-time library set-up, at a negligible size
        peak = peak_memory_mb(lambda: forward(layer, x))
    print("nan" if peak is None else peak)


def peak_mb(name: str, a: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--measure", name, "--seq-len", str(a.seq_len),
           "--max-relative-position", str(a.max_relative_position), "--threads", str(a.threads)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def check_reference(P: int, T: int) -> float:
    """max |XL reference - headmods RMHA| with the same weights (labml row P - Δ is our row P + Δ)."""
    xl, rmha = build("xl", P), build("rmha", P)
    with torch.no_grad():
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(rmha, part).load_state_dict(getattr(xl, part).state_dict())
        rmha.content_bias.copy_(xl.u)
        rmha.rel_key[P:].copy_(xl.R[1:P + 1].flip(0))  # our row P + t (offset t) = labml row P - t
        rmha.rel_bias[P:].copy_(xl.b[1:P + 1].flip(0))
        x = torch.randn(1, T, D)
        return (forward(xl, x) - forward(rmha, x)).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-relative-position", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    T, P = a.seq_len, a.max_relative_position
    if a.measure:
        return measure(a.measure, T, P, a.threads)
    if T > P:
        raise SystemExit(f"the labml-style reference needs seq_len <= max_relative_position, got {T} > {P}")
    names = {"mha": "MHA (SDPA)", "rcmha": "RCMHA (conv + relative)", "mdha": "MDHA (conv only)",
             "rmha": "RMHA (relative only)", "xl": "Transformer-XL RMHA reference (labml-style, eager)"}
    layers = {key: build(key, P) for key in names}
    x = torch.randn(1, T, D)
    err = check_reference(P, min(T, 64))
    with torch.no_grad():
        res = compare({names[k]: (lambda m=m: forward(m, x)) for k, m in layers.items()}, rounds=a.rounds,
                      threads=a.threads, memory=False)
    peaks = {key: peak_mb(key, a) for key in names}
    print(f"D={D} h={H} d={D // H}, B=1, T={T}, causal forward, P={P}, conv kernel 3 (shared), fp32, torch "
          f"{torch.__version__}, {res.threads} threads, median of {a.rounds} rounds; "
          f"max |XL reference - headmods RMHA| = {err:.1e}\n")
    print("| candidate | parameters | median ms | time ratio vs MHA | peak MB (fresh process) |")
    print("|---|---:|---:|---:|---:|")
    for key, name in names.items():
        params = sum(q.numel() for q in layers[key].parameters())
        print(f"| {name} | {params:,} | {res.median_ms(name):.2f} | {res.ratio(name):.3f} | {peaks[key]:.1f} |")


if __name__ == "__main__":
    main()
