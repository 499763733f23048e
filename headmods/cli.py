"""The ``headmods`` command (thin: it parses arguments, then calls the library).

    headmods ls      list the registered attention variants
    headmods demo    build every variant, run it, print output shapes and timings
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import __version__
from .bench import compare
from .registry import create, list_variants


def _ls(args: argparse.Namespace) -> int:
    for name in list_variants():
        print(name)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Every registered layer on one random batch: output shape, parameters and speed against MHA."""
    torch.manual_seed(args.seed)
    B, T, D, h = args.batch, args.seq_len, args.embed_dim, args.num_heads
    x = torch.randn(B, T, D)
    print(f"headmods {__version__}: each variant on x of shape {tuple(x.shape)} (batch-first, causal), "
          f"torch {torch.__version__}, {args.threads} threads\n")
    layers = {name: create(name, D, h, batch_first=True).eval() for name in list_variants()}
    runs = {name: (lambda layer=layer: layer(x, is_causal=True)) for name, layer in layers.items()}
    with torch.no_grad():
        shapes = {name: tuple(run()[0].shape) for name, run in runs.items()}
        result = compare(runs, baseline="mha", warmup=1, rounds=args.rounds, threads=args.threads, memory=False)
    print("| variant | parameters | output shape | median ms | ratio vs mha |")
    print("|---|---:|---|---:|---:|")
    for name, layer in layers.items():
        params = sum(p.numel() for p in layer.parameters())
        print(f"| {name} | {params:,} | {shapes[name]} | {result.median_ms(name):.2f} | {result.ratio(name):.3f} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headmods", description="Head-structured attention layers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"headmods {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list the registered attention variants").set_defaults(func=_ls)
    demo = sub.add_parser("demo", help="build every variant and print shapes and timings")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--embed-dim", type=int, default=256)
    demo.add_argument("--num-heads", type=int, default=8)
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--threads", type=int, default=torch.get_num_threads())
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"headmods {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
