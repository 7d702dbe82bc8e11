"""Embedding directories: sharded vectors with their ids and a manifest, written resumably and atomically.

Layout of a directory::

    manifest.json                     what was embedded, by which model, and the finished shards
    emb-00000.npy + emb-00000.ids.json   (file_format npy), or
    emb-00000.safetensors                (file_format safetensors; ids in its metadata)

A shard counts as finished once the manifest lists it; its files are renamed into place before
that, so a crash leaves at worst an unlisted shard that the next run rewrites.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dualenc.fileio import write_json_atomic  # noqa: F401  (re-exported: eval.report, index)

FORMAT = "dualenc-embedding-dir/1"  # (plugins/embeddings.py names its single-file format dualenc-embeddings/1)
MANIFEST = "manifest.json"
FILE_FORMATS = ("npy", "safetensors")


def _replace_into(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # some writers create private (0600) files; embeddings are meant to be shared
    os.replace(tmp, final)


class EmbeddingWriter:
    """Writes one embedding directory; reopening it with the same identity resumes it.

    Args:
        out_dir: the directory (created if missing).
        kind: ``image`` or ``text``.
        model / source: what made the vectors and from what (recorded; must match on resume).
        file_format: ``npy`` or ``safetensors``.
        params: settings that decide shard contents (e.g. shard size); must match on resume.
        overwrite: start over even if ``out_dir`` holds other embeddings.
    """

    def __init__(self, out_dir: str | Path, kind: str, model: str, source: str, file_format: str = "npy",
                 params: dict[str, Any] | None = None, overwrite: bool = False) -> None:
        if kind not in ("image", "text"):
            raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
        if file_format not in FILE_FORMATS:
            raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        identity = {"kind": kind, "model": model, "source": source, "file_format": file_format,
                    "params": dict(params or {})}
        path = self.dir / MANIFEST
        try:
            old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); delete it (and the shards beside it) or use "
                             "another output directory") from None
        if old is not None and not overwrite:
            if old.get("format") != FORMAT:
                raise ValueError(f"{path} is not a dualenc embeddings manifest; choose another output directory")
            diff = "; ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in identity.items() if old.get(k) != v)
            if diff:
                raise ValueError(f"{self.dir} already holds other embeddings ({diff}); use another output "
                                 "directory, or --overwrite to replace them")
            self.manifest = dict(old, complete=False)  # resuming: complete again only after finish()
            write_json_atomic(path, self.manifest)
        else:
            if old is not None:  # overwrite: forget the old shards (their files are rewritten or removed)
                for name in old.get("shards", {}):
                    for f in _shard_files(self.dir, name, old.get("file_format", "npy")):
                        f.unlink(missing_ok=True)
            self.manifest = {"format": FORMAT, **identity, "dim": None, "dtype": "float32", "shards": {},
                             "complete": False}
            write_json_atomic(path, self.manifest)

    def done(self, name: str) -> bool:
        """Whether shard ``name`` is finished (listed and its files present)."""
        return name in self.manifest["shards"] and all(
            f.is_file() for f in _shard_files(self.dir, name, self.manifest["file_format"]))

    def write(self, name: str, vectors: np.ndarray | torch.Tensor, ids: list[str],
              info: dict[str, Any] | None = None) -> None:
        """Write shard ``name`` (``vectors`` (n, D) with one id each) and list it in the manifest."""
        vec = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
        vec = np.ascontiguousarray(vec, dtype=np.float32)
        if vec.ndim != 2 or vec.shape[0] != len(ids):
            raise ValueError(f"shard {name}: {vec.shape} vectors for {len(ids)} ids; need one (D,) row per id")
        dim = self.manifest["dim"]
        if dim is not None and vec.shape[0] and vec.shape[1] != dim:
            raise ValueError(f"shard {name}: embedding size {vec.shape[1]} differs from the directory's {dim}; "
                             "a directory holds one model's embeddings")
        fmt = self.manifest["file_format"]
        files = _shard_files(self.dir, name, fmt)
        tmps = [f.with_name(f".{f.name}.tmp-{os.getpid()}") for f in files]
        try:
            if fmt == "npy":
                tmps[1].write_text(json.dumps(ids), encoding="utf-8")
                with open(tmps[0], "wb") as f:
                    np.save(f, vec, allow_pickle=False)
            else:
                from safetensors.numpy import save_file

                save_file({"embeddings": vec}, str(tmps[0]), metadata={"ids": json.dumps(ids), "format": FORMAT})
            for tmp, final in zip(tmps[::-1], files[::-1]):  # ids first: the vectors file completes a shard
                _replace_into(tmp, final)
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
        if vec.shape[0]:
            self.manifest["dim"] = int(vec.shape[1])
        self.manifest["shards"][name] = {"count": int(vec.shape[0]), **(info or {})}
        write_json_atomic(self.dir / MANIFEST, self.manifest)

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Mark the directory complete (all shards written); ``extra`` goes into the manifest."""
        self.manifest.update(extra, complete=True, count=sum(s["count"] for s in self.manifest["shards"].values()))
        write_json_atomic(self.dir / MANIFEST, self.manifest)
        return self.manifest


def _shard_files(root: Path, name: str, fmt: str) -> list[Path]:
    if fmt == "npy":
        return [root / f"{name}.npy", root / f"{name}.ids.json"]
    return [root / f"{name}.safetensors"]


@dataclass
class EmbeddingSet:
    ids: list[str]
    vectors: np.ndarray  # (N, D) float32
    manifest: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.vectors))


def read_manifest(path: str | Path) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not an embeddings directory: no {MANIFEST} (make one with `dualenc embed`)")
    manifest = json.loads(f.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{f}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def iter_shards(path: str | Path, allow_partial: bool = False) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """(shard name, ids, vectors) of each finished shard, in name order; nothing is unpickled."""
    root = Path(path)
    manifest = read_manifest(root)
    if not manifest.get("complete") and not allow_partial:
        raise ValueError(f"{root} is incomplete ({len(manifest['shards'])} shard(s) so far); rerun the same "
                         "`dualenc embed` command to finish it, or pass allow_partial=True")
    for name in sorted(manifest["shards"]):
        files = _shard_files(root, name, manifest["file_format"])
        if manifest["file_format"] == "npy":
            vec = np.load(files[0], allow_pickle=False)
            ids = json.loads(files[1].read_text(encoding="utf-8"))
        else:
            from safetensors import safe_open

            with safe_open(str(files[0]), framework="numpy") as f:
                vec = f.get_tensor("embeddings")
                ids = json.loads((f.metadata() or {}).get("ids", "[]"))
        if vec.ndim != 2 or vec.shape[0] != len(ids) or vec.shape[0] != manifest["shards"][name]["count"]:
            raise ValueError(f"{root}/{name}: {vec.shape} vectors, {len(ids)} ids, manifest says "
                             f"{manifest['shards'][name]['count']}; the shard is damaged, delete it and rerun")
        if manifest.get("dim") is not None and vec.shape[0] and vec.shape[1] != manifest["dim"]:
            raise ValueError(f"{root}/{name}: embedding size {vec.shape[1]} differs from the manifest's "
                             f"{manifest['dim']}; the shard is damaged, delete it and rerun")
        yield name, ids, vec


def load_embeddings(path: str | Path, allow_partial: bool = False) -> EmbeddingSet:
    """All vectors and ids of an embeddings directory, concatenated in shard order."""
    manifest = read_manifest(path)
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for _, shard_ids, vec in iter_shards(path, allow_partial):
        ids += shard_ids
        if vec.shape[0]:
            parts.append(vec)
    if not parts:
        raise ValueError(f"{path} holds no embeddings")
    vectors = np.concatenate(parts).astype(np.float32, copy=False)
    return EmbeddingSet(ids=ids, vectors=vectors, manifest=manifest)
