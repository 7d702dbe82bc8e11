"""``dualenc index build``: stream an embeddings directory into a FAISS index on disk.

Memory is one chunk of vectors plus the index itself (for ``Flat`` that is every vector, for IVF-PQ
a few bytes per vector) plus the training sample of trainable indexes: never the whole directory.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dualenc.errors import UserError
from dualenc.index.store import (INDEX_FILE, IndexMeta, KeyWriter, commit_dir, import_faiss, iter_chunks,
                                 load_manifest, sample_rows, temp_dir_for)

METRICS = ("inner_product", "l2")
DEFAULT_CHUNK = 65536  # rows per add(): 128 MiB of 512-d float32


def default_compressed_factory(count: int, dim: int) -> str:
    """An IVF-PQ string sized for ``count`` vectors: about 4 sqrt(n) lists (at most 4096, which a
    2-core machine trains in minutes; bench/bench_index.py), dim/8 bytes per vector.

    Tiny sets get plain PQ with 4-bit codes: IVF and 8-bit codebooks need more training points than
    they have (FAISS wants ~39 per centroid). ``np``: no polysemous training, which FAISS otherwise runs
    for every PQ factory string and which took minutes on 2 cores for codes nobody searches by Hamming.
    """
    m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0)
    if count < 256 * 39:
        return f"PQ{m}x4np"
    nlist = 2 ** max(4, min(12, round(math.log2(4 * math.sqrt(count)))))
    return f"IVF{nlist},PQ{m}np"


def default_search_params(index: Any) -> str:
    """nprobe for IVF (1/16 of the lists, at least 8), efSearch for HNSW: a recall-first start."""
    faiss = import_faiss()
    params = []
    try:
        ivf = faiss.extract_index_ivf(index)
        params.append(f"nprobe={min(ivf.nlist, max(8, ivf.nlist // 16))}")
    except RuntimeError:
        pass
    if "HNSW" in type(faiss.downcast_index(index)).__name__:
        params.append("efSearch=64")
    return ",".join(params)


def model_identity(manifest: dict[str, Any], model: str | None) -> tuple[str, str | None]:
    """(name, weight fingerprint) of the model that made the vectors, as a map's metadata names it.

    The fingerprint is that of ``align embed --target dualenc`` (plugins/targets.py), so a map fitted on
    those embeddings is checked by weights, not by a path that may be spelled differently.
    """
    path = model or manifest.get("model")
    if path and (Path(path) / "config.json").is_file():
        weights = Path(path) / "model.safetensors"
        return _export_identity(str(path), weights.stat().st_mtime_ns if weights.is_file() else 0)
    if model:
        raise UserError(f"--model {model} is not a dualenc export directory (no config.json); give the export "
                        "that made the embeddings, or leave --model out to record the manifest's model name")
    return str(manifest.get("model")), None


@functools.lru_cache(maxsize=16)
def _export_identity(path: str, mtime_ns: int) -> tuple[str, str | None]:
    # Loading an export to hash its weights takes seconds; index eval asks twice per index.
    from dualenc.plugins.targets import DualencTarget

    ident = DualencTarget(path).identity()
    return ident.name, ident.fingerprint


def build_index(embeddings: str | Path, out: str | Path, factory: str = "Flat", metric: str = "inner_product",
                normalize: bool = True, chunk_rows: int = DEFAULT_CHUNK, train_size: int | None = None,
                model: str | None = None, search_params: str | None = None, overwrite: bool = False,
                threads: int | None = None, log: Callable[[str], None] = print,
                on_chunk: Callable[[np.ndarray], None] | None = None) -> IndexMeta:
    """Build ``out`` from ``embeddings`` (a ``dualenc embed`` directory); returns the written metadata.

    ``on_chunk`` sees each chunk of vectors as added (after normalization), e.g. to compute exact
    neighbours of some queries in the same pass over the data (bench/bench_index.py).
    """
    faiss = import_faiss()
    if metric not in METRICS:
        raise UserError(f"metric must be one of {METRICS}, got {metric!r}")
    if threads:
        faiss.omp_set_num_threads(threads)
    manifest = load_manifest(embeddings)
    count, dim = int(manifest["count"]), int(manifest["dim"])
    factory = default_compressed_factory(count, dim) if factory == "auto" else factory
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT if metric == "inner_product"
                                    else faiss.METRIC_L2)
    except RuntimeError as e:
        raise UserError(f"FAISS cannot build index factory {factory!r} for {dim}-dim vectors "
                        f"({str(e).strip().splitlines()[-1]}); try 'Flat', 'HNSW32', 'IVF1024,PQ64' or 'auto'") from None
    name, fingerprint = model_identity(manifest, model)
    out = Path(out)
    tmp = temp_dir_for(out, overwrite)
    t0 = time.perf_counter()
    n_train = 0
    try:
        if not index.is_trained:
            n_train = min(count, train_size or _default_train_size(index, count))
            log(f"training {factory} on {n_train} of {count} vectors")
            x = sample_rows(embeddings, n_train)
            if normalize:
                faiss.normalize_L2(x)
            try:
                index.train(x)
            except RuntimeError as e:
                raise UserError(f"training {factory!r} on {len(x)} vectors failed ({str(e).strip().splitlines()[-1]}); "
                                "give more vectors (--train-size) or a smaller index (fewer IVF lists, 4-bit PQ "
                                "codes such as PQ16x4)") from None
            del x
        keys = KeyWriter(tmp, count)
        added = 0
        for ids, vec in iter_chunks(embeddings, chunk_rows):
            if not np.isfinite(vec).all():
                bad = int((~np.isfinite(vec).all(axis=1)).sum())
                raise UserError(f"{embeddings}: {bad} vector(s) near row {added} contain NaN or inf; re-embed them")
            if normalize:
                faiss.normalize_L2(vec)
            index.add(vec)
            if on_chunk is not None:
                on_chunk(vec)
            keys.add(ids)
            added += len(ids)
            log(f"added {added}/{count}")
        keys.close()
        faiss.write_index(index, str(tmp / INDEX_FILE))
        params = default_search_params(index) if search_params is None else search_params
        meta = IndexMeta(model=name, dim=dim, fingerprint=fingerprint, kind=manifest["kind"], factory=factory,
                         metric=metric, normalized=normalize, count=count,
                         embeddings=str(Path(embeddings).resolve()), train_size=n_train, search_params=params,
                         extra={"faiss_version": faiss.__version__, "build_seconds": round(time.perf_counter() - t0, 2),
                                "chunk_rows": chunk_rows})
        commit_dir(tmp, out, meta)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _default_train_size(index: Any, count: int) -> int:
    faiss = import_faiss()
    try:
        return max(65536, 64 * faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 65536
