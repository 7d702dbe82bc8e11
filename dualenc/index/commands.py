"""``dualenc index {build,eval,info}`` and ``dualenc search`` (each ``main(argv) -> exit code``)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from dualenc.clihelp import DefaultsParser
from dualenc.errors import UserError


def _write_json(path: str, obj: object) -> None:
    from dualenc.eval.store import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, obj)


def cmd_build(a: argparse.Namespace) -> int:
    from dualenc.index.build import build_index

    meta = build_index(a.embeddings, a.out, factory=a.factory, metric=a.metric, normalize=not a.no_normalize,
                       chunk_rows=a.chunk, train_size=a.train_size, model=a.model, search_params=a.search_params,
                       overwrite=a.overwrite, threads=a.threads, log=(lambda s: None) if a.quiet else print)
    print(f"built {meta.factory} index of {meta.count} {meta.kind} vectors (dim {meta.dim}, model {meta.model}) "
          f"at {a.out} in {meta.extra['build_seconds']} s")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from dualenc.index.store import read_meta

    print(json.dumps(asdict(read_meta(a.index)), indent=2, sort_keys=True))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from dualenc.index.evaluate import evaluate, format_table

    ks = tuple(int(k) for k in a.ks.split(","))
    report = evaluate(a.old_images, a.new_images, a.old_queries, a.new_queries, a.map, factories=a.factory or
                      ["Flat", "auto"], ks=ks, old_model=a.old_model, new_model=a.new_model, params=a.search_params,
                      work_dir=a.keep)
    print(format_table(report))
    if a.json:
        _write_json(a.json, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = DefaultsParser(prog="dualenc index", description="FAISS indexes of `dualenc embed` directories.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("build", help="stream an embeddings directory into an index directory")
    s.add_argument("--embeddings", required=True, help="a directory written by `dualenc embed`")
    s.add_argument("--out", required=True, help="the index directory to write")
    s.add_argument("--factory", default="Flat", help="FAISS index factory string: Flat (exact), HNSW32, "
                   "IVF4096,PQ64, ...; 'auto' picks an IVF-PQ sized for the count")
    s.add_argument("--metric", choices=("inner_product", "l2"), default="inner_product")
    s.add_argument("--no-normalize", action="store_true", help="add vectors as they are (default: L2-normalize, "
                   "so inner product is cosine similarity)")
    s.add_argument("--chunk", type=int, default=65536, help="vectors read and added at a time (bounds memory)")
    s.add_argument("--train-size", type=int, help="vectors sampled to train IVF/PQ (default: 64 per list)")
    s.add_argument("--model", help="the dualenc export that made the embeddings (default: the manifest's); its "
                   "weight fingerprint is recorded so maps are checked against it")
    s.add_argument("--search-params", help="default FAISS search parameters, e.g. nprobe=32 (default: chosen "
                   "for the factory)")
    s.add_argument("--threads", type=int, help="FAISS threads (default: all cores)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("info", help="print an index's metadata")
    s.add_argument("index")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("eval", help="recall@k of re-embedding vs mapping NEW queries into the OLD index vs OLD "
                       "alone, on exact and compressed indexes")
    s.add_argument("--old-images", required=True, help="embeddings of the indexed items by the OLD model")
    s.add_argument("--new-images", required=True, help="the same items embedded by the NEW model")
    s.add_argument("--old-queries", required=True, help="held-out queries embedded by the OLD model")
    s.add_argument("--new-queries", required=True, help="the same queries embedded by the NEW model")
    s.add_argument("--map", required=True, help="NEW -> OLD map (`dualenc align fit`)")
    s.add_argument("--old-model", help="OLD export (default: the embeddings manifest's model)")
    s.add_argument("--new-model", help="NEW export (default: the embeddings manifest's model)")
    s.add_argument("--factory", action="append", help="index factory to evaluate (repeatable; default: Flat "
                   "and auto)")
    s.add_argument("--search-params", help="FAISS search parameters for every index, e.g. nprobe=16")
    s.add_argument("--ks", default="1,10")
    s.add_argument("--keep", help="build the indexes in this directory and keep them")
    s.add_argument("--json", help="also write the report here")
    s.set_defaults(fn=cmd_eval)
    return p


def cmd_index(argv: list[str]) -> int:
    """dualenc index {build,info,eval} ..."""
    a = build_parser().parse_args(argv)
    return a.fn(a)  # dualenc.cli.main prints UserError (exit 2; --debug shows it)


def search_parser() -> argparse.ArgumentParser:
    p = DefaultsParser(prog="dualenc search", description="Top-k keys of an index for texts, images or "
                       "an embeddings directory of queries; with --map, NEW model queries search an "
                       "index of OLD embeddings.")
    p.add_argument("--index", required=True, help="an index directory (`dualenc index build`)")
    p.add_argument("--model", help="the dualenc export that embeds the queries (needed for --text/--image)")
    p.add_argument("--map", help="NEW -> OLD map: queries by --model are moved into the index's space")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", action="append", help="a text query (repeatable)")
    q.add_argument("--image", action="append", help="an image file query (repeatable)")
    q.add_argument("--queries", help="an embeddings directory of queries (`dualenc embed`)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--search-params", help="FAISS search parameters, e.g. nprobe=32 or efSearch=128")
    p.add_argument("--mmap", action="store_true", help="memory-map the index file instead of reading it (for "
                   "indexes larger than RAM; slower first queries)")
    p.add_argument("--json", help="write the results here (default: print JSON lines)")
    return p


def _search(a: argparse.Namespace) -> int:
    from dualenc.index.search import embed_images, query_model, search

    if a.k < 1:
        raise UserError(f"--k must be >= 1, got {a.k}")
    if a.queries:
        from dualenc.eval.store import load_embeddings
        from dualenc.index.build import model_identity
        from dualenc.index.store import load_manifest
        from dualenc.plugins.mapfile import ModelId

        manifest = load_manifest(a.queries)
        if a.model and os.path.abspath(a.model) != os.path.abspath(str(manifest.get("model"))):
            raise UserError(f"{a.queries} was embedded by {manifest.get('model')}, not --model {a.model}; "
                            "leave --model out or give the model that embedded the queries")
        data = load_embeddings(a.queries)
        name, fp = model_identity(manifest, a.model)
        vectors, labels, modality, source = data.tensor(), data.ids, manifest["kind"], ModelId(name, data.dim, fp)
    else:
        if not a.model:
            raise UserError("--text/--image queries need --model EXPORT to embed them")
        target = query_model(a.model)
        source = target.identity()
        if a.text:
            vectors, labels, modality = target.encode_text(a.text), a.text, "text"
        else:
            vectors, labels, modality = embed_images(target, a.image), a.image, "image"
    found = search(a.index, vectors, modality, source, a.map, a.k, a.search_params, mmap=a.mmap)
    rows = [{"query": q, "results": r} for q, r in zip(labels, found)]
    if a.json:
        _write_json(a.json, rows)
        print(f"wrote top-{a.k} of {len(rows)} queries to {a.json}")
    else:
        for row in rows:
            print(json.dumps(row))
    return 0


def cmd_search(argv: list[str]) -> int:
    """dualenc search --index INDEX (--text T | --image F | --queries DIR) [--model NEW] [--map NEW2OLD]"""
    return _search(search_parser().parse_args(argv))  # dualenc.cli.main prints UserError (exit 2)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"index": cmd_index, "search": cmd_search}
