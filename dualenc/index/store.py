"""Index directories: a FAISS index, its keys, and what the vectors are, written atomically.

Layout of ``INDEX/``::

    meta.json          format, model (name/dim/fingerprint), factory, metric, normalization, count
    index.faiss        faiss.write_index of the index; FAISS id i is row i of the embeddings in shard order
    keys.jsonl         one JSON string per line: the sample key of id i on line i
    key_offsets.npy    (count + 1,) uint64 byte offsets into keys.jsonl: a key is read without loading the rest

The directory is built under a temporary name beside ``INDEX`` and renamed into place when complete,
so a crash never leaves a half-written index where a reader would find it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dualenc.errors import UserError
from dualenc.eval.store import MANIFEST, read_manifest, write_json_atomic

INDEX_FORMAT = "dualenc-index/1"
META, INDEX_FILE, KEYS, OFFSETS = "meta.json", "index.faiss", "keys.jsonl", "key_offsets.npy"


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise UserError("dualenc index/search need FAISS, which is not installed; "
                        "install it with: pip install 'dualenc[index]' (or pip install faiss-cpu)") from None
    return faiss


@dataclass
class IndexMeta:
    """What an index holds; the model fields are what a map's metadata is checked against."""

    model: str  # name of the model that made the vectors (a dualenc export path, or a map's target name)
    dim: int
    fingerprint: str | None  # weight fingerprint (plugins/mapfile.py) of that model, when known
    kind: str  # image or text
    factory: str  # FAISS index factory string
    metric: str  # inner_product or l2
    normalized: bool  # vectors were L2-normalized before adding (inner product = cosine)
    count: int
    embeddings: str  # the embeddings directory it was built from
    train_size: int = 0
    search_params: str = ""  # FAISS ParameterSpace string applied at search time, e.g. "nprobe=16"
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = INDEX_FORMAT

    def model_id(self) -> Any:
        from dualenc.plugins.mapfile import ModelId

        return ModelId(self.model, self.dim, self.fingerprint)


def _shard_path(root: Path, name: str, fmt: str) -> Path:
    return root / (f"{name}.npy" if fmt == "npy" else f"{name}.safetensors")


def _open_shards(root: Path, manifest: dict[str, Any]) -> Iterator[tuple[list[str], Callable[[Any], np.ndarray]]]:
    """(ids, rows) per non-empty shard in name order; ``rows(slice or index array)`` reads only those rows."""
    fmt = manifest["file_format"]
    for name in sorted(manifest["shards"]):
        count = int(manifest["shards"][name]["count"])
        if count == 0:
            continue
        path = _shard_path(root, name, fmt)
        if fmt == "npy":
            vec = np.load(path, mmap_mode="r", allow_pickle=False)  # pages are read when rows are touched
            ids = json.loads((root / f"{name}.ids.json").read_text(encoding="utf-8"))
            rows: Callable[[Any], np.ndarray] = vec.__getitem__
            shape = vec.shape
        else:
            from safetensors import safe_open

            handle = safe_open(str(path), framework="numpy")
            sl = handle.get_slice("embeddings")
            ids = json.loads((handle.metadata() or {}).get("ids", "[]"))

            def rows(sel: Any, sl: Any = sl) -> np.ndarray:  # safetensors slices are contiguous ranges
                if isinstance(sel, slice):
                    return sl[sel]
                return np.stack([sl[int(i):int(i) + 1][0] for i in sel]) if len(sel) else np.empty((0, dim))
            shape = tuple(sl.get_shape())
        dim = manifest["dim"]
        if len(shape) != 2 or shape[0] != count or len(ids) != count or shape[1] != dim:
            raise UserError(f"{root}/{name}: {shape} vectors and {len(ids)} ids, the manifest says {count} x "
                            f"{dim}; the shard is damaged: delete it and rerun `dualenc embed`")
        yield ids, rows


def iter_chunks(emb_dir: str | Path, chunk_rows: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, float32 vectors) of an embeddings directory, at most ``chunk_rows`` rows at a time.

    Shards are memory-mapped (npy) or sliced (safetensors), so only one chunk of vectors is ever
    copied into memory however large a shard or the directory is; nothing is unpickled.
    """
    if chunk_rows < 1:
        raise UserError(f"chunk size must be >= 1, got {chunk_rows}")
    root = Path(emb_dir)
    for ids, rows in _open_shards(root, load_manifest(root)):
        for a in range(0, len(ids), chunk_rows):
            b = min(len(ids), a + chunk_rows)
            yield ids[a:b], np.array(rows(slice(a, b)), dtype=np.float32, copy=True)


def load_manifest(emb_dir: str | Path) -> dict[str, Any]:
    """A complete embeddings directory's manifest, or a UserError saying what to do."""
    root = Path(emb_dir)
    if not (root / MANIFEST).is_file():
        raise UserError(f"{root} is not an embeddings directory (no {MANIFEST}); make one with "
                        "`dualenc embed --model EXPORT --images SRC --out DIR`")
    try:
        manifest = read_manifest(root)
    except ValueError as e:
        raise UserError(f"{e}; point at a directory written by `dualenc embed`") from None
    if not manifest.get("complete"):
        raise UserError(f"{root} is incomplete ({len(manifest['shards'])} shard(s) so far); rerun the same "
                        "`dualenc embed` command to finish it first")
    if not manifest.get("count"):
        raise UserError(f"{root} holds no embeddings")
    return manifest


def sample_rows(emb_dir: str | Path, n: int) -> np.ndarray:
    """``n`` rows spread evenly over the whole directory (shards may be sorted by source): a training set.

    Only the sampled rows are read (memory-mapped shards), not a pass over every vector.
    """
    root = Path(emb_dir)
    manifest = load_manifest(root)
    total = int(manifest["count"])
    want = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))
    out = np.empty((len(want), int(manifest["dim"])), dtype=np.float32)
    start = filled = 0
    for ids, rows in _open_shards(root, manifest):
        stop = start + len(ids)
        lo, hi = np.searchsorted(want, [start, stop])
        if hi > lo:
            out[filled:filled + hi - lo] = rows(want[lo:hi] - start)
            filled += hi - lo
        start = stop
    return out


class KeyWriter:
    """Streams keys to ``keys.jsonl`` and their byte offsets to a memory-mapped ``key_offsets.npy``."""

    def __init__(self, root: Path, count: int) -> None:
        self.f = open(root / KEYS, "wb")
        self.offsets = np.lib.format.open_memmap(root / OFFSETS, mode="w+", dtype=np.uint64, shape=(count + 1,))
        self.n, self.pos, self.count = 0, 0, count

    def add(self, keys: list[str]) -> None:
        if self.n + len(keys) > self.count:
            raise UserError(f"the embeddings hold more rows than their manifest's count {self.count}; "
                            "the directory is damaged: rerun `dualenc embed`")
        for k in keys:
            line = (json.dumps(str(k)) + "\n").encode("utf-8")
            self.offsets[self.n] = self.pos
            self.f.write(line)
            self.pos += len(line)
            self.n += 1

    def close(self) -> None:
        self.offsets[self.n] = self.pos
        self.offsets.flush()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if self.n != self.count:
            raise UserError(f"read {self.n} rows, the manifest says {self.count}; the embeddings directory is "
                            "damaged: rerun `dualenc embed`")


class Keys:
    """Id -> key lookups without reading every key."""

    def __init__(self, root: Path) -> None:
        self.offsets = np.load(root / OFFSETS, mmap_mode="r", allow_pickle=False)
        self.path = root / KEYS

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, ids: np.ndarray) -> list[str | None]:
        out: list[str | None] = []
        with open(self.path, "rb") as f:
            for i in np.asarray(ids).reshape(-1).tolist():
                if i < 0 or i >= len(self):  # FAISS pads short result lists with -1
                    out.append(None)
                    continue
                a, b = int(self.offsets[i]), int(self.offsets[i + 1])
                f.seek(a)
                out.append(json.loads(f.read(b - a)))
        return out


def temp_dir_for(out: Path, overwrite: bool) -> Path:
    """An empty build directory beside ``out`` (same filesystem, so the final rename is atomic)."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if out.exists() and not (out / META).is_file():
        raise UserError(f"{out} exists and is not a dualenc index; refusing to replace it, choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out: Path, meta: IndexMeta) -> Path:
    """Write ``meta.json`` last, then move the finished directory to ``out`` (replacing an old index)."""
    for name in (INDEX_FILE, KEYS, OFFSETS):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    write_json_atomic(tmp / META, asdict(meta))
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def read_meta(index_dir: str | Path) -> IndexMeta:
    root = Path(index_dir)
    path = root / META
    if not path.is_file():
        raise UserError(f"{root} is not a dualenc index (no {META}); build one with "
                        "`dualenc index build --embeddings DIR --out INDEX`")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != INDEX_FORMAT:
        raise UserError(f"{path}: format {data.get('format')!r}, expected {INDEX_FORMAT!r}; rebuild the index "
                        "with this version of dualenc")
    return IndexMeta(**data)


def open_index(index_dir: str | Path, mmap: bool = False) -> tuple[Any, IndexMeta, Keys]:
    """(FAISS index, its metadata, its keys). ``mmap`` maps the index file instead of reading it."""
    faiss = import_faiss()
    root = Path(index_dir)
    meta = read_meta(root)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    index = faiss.read_index(str(root / INDEX_FILE), flags)
    if index.ntotal != meta.count or index.d != meta.dim:
        raise UserError(f"{root}: the index holds {index.ntotal} x {index.d}, its {META} says {meta.count} x "
                        f"{meta.dim}; the index is damaged, rebuild it")
    return index, meta, Keys(root)
