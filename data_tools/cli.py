"""``dualenc-data``: dataset tools (demo dataset, WordPiece vocab; more subcommands plug in below)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

# name -> (help, add_arguments, run). run returns the exit code. New subcommands (build,
# filter, stats, dedupe) only need an entry here.
Subcommand = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


class UsageError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (created; must be empty or an old demo)")
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-heldout", type=int, default=1200)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--shard-size", type=int, default=2000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo build in --out")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import build_demo  # lazy: keeps `--help` fast

    t0 = time.perf_counter()
    summary = build_demo(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        n_heldout=args.n_heldout,
        image_size=args.image_size,
        shard_size=args.shard_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    dt = time.perf_counter() - t0
    for split, info in summary["splits"].items():
        print(f"{split:8s} {info['samples']:6d} samples  {info['classes']:2d} classes  {len(info['shards'])} shard(s)")
    kinds = ", ".join(f"{k} {v}" for k, v in summary["splits"]["train"]["caption_kinds"].items())
    print(f"train captions: {kinds}")
    print(f"wrote {args.out} in {dt:.1f}s")
    return 0


def _add_tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="tar file, directory, glob or brace pattern")
    p.add_argument("--out", required=True, help="output directory for the tokenizer")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def _run_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import expand_shards, iter_captions, train_wordpiece

    paths = expand_shards(args.shards)  # fail fast, before training starts
    tok = train_wordpiece(
        iter_captions(paths),
        args.out,
        vocab_size=args.vocab_size,
        lowercase=not args.cased,
        min_frequency=args.min_frequency,
        overwrite=args.overwrite,
    )
    print(f"trained WordPiece vocab of {len(tok)} tokens on {len(paths)} shard(s); saved to {args.out}")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": ("build the synthetic color/shape demo dataset", _add_demo, _run_demo),
    "tokenizer": ("train a WordPiece vocab on shard captions", _add_tokenizer, _run_tokenizer),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualenc-data", description="Dataset tools for dualenc.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = SUBCOMMANDS[args.command][2]
    try:
        return run(args)
    except (UsageError, FileNotFoundError, FileExistsError, ValueError) as e:
        # Expected user errors: one line, no traceback.
        print(f"dualenc-data {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dualenc-data {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
