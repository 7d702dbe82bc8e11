"""``dualenc search``: top-k keys of an index for texts, images or an embeddings directory of queries.

With ``--map NEW2OLD.safetensors`` the queries are embedded by the NEW model and moved into the index's
(OLD) space by the map before searching: the map's source must be the query model and its target the
index's model, checked by weight fingerprints (names when a side has none), as `dualenc align apply` does.

Why the map is applied here and not inside FAISS (an ``IndexPreTransform`` with a ``LinearTransform``):
FAISS would apply the transform to everything the index sees, vectors added as well as queries, while
an upgraded index holds OLD vectors that must stay untouched and still serve OLD queries; a pre-transform
wrapper would have to be a second, query-only index file per map. The map is also more than a matrix:
per-modality mean shifts (a text and an image query shift differently), non-linear maps (vec2vec) that
no LinearTransform can hold, the metadata check, float64 application and renormalization for cosine.
Mapping a query costs one dim x dim product, nothing next to the search, so the index file stays
model-pure and any map (or none) can be used with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualenc.errors import UserError
from dualenc.index.store import IndexMeta, Keys, import_faiss, open_index


def query_model(model: str) -> Any:
    """The dualenc export that embeds queries (a plugins Target: normalized embeddings + identity)."""
    if not (Path(model) / "config.json").is_file():
        raise UserError(f"--model {model} is not a dualenc export directory (no config.json); give the "
                        "directory written by `dualenc export` or ExportOnFitEnd")
    from dualenc.plugins.targets import DualencTarget

    return DualencTarget(model)


def embed_images(target: Any, files: list[str]) -> torch.Tensor:
    from PIL import Image

    from dualenc.data.transforms import image_transform

    tf = image_transform(target.data_config(), train=False)
    pixels = []
    for f in files:
        try:
            with Image.open(f) as im:
                pixels.append(tf(im.convert("RGB")))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image {f} ({e}); give a JPEG/PNG/WebP file") from None
    return target.encode_image(torch.stack(pixels))


def check_same_model(index_meta: IndexMeta, query: Any, what: str) -> None:
    """Without a map, queries must come from the index's model (else scores compare unrelated spaces)."""
    from dualenc.plugins.mapfile import MapMismatchError, check_model

    try:
        check_model(index_meta.model_id(), query, "model")
    except MapMismatchError:
        name = getattr(query, "name", query)
        raise UserError(f"the index holds embeddings of {index_meta.model!r} but the {what} come from {name!r}; "
                        "embed the queries with the index's model, or pass --map NEW2OLD.safetensors (fitted "
                        "with `dualenc align fit`) to move them into the index's space") from None


def map_queries(vectors: torch.Tensor, map_path: str, modality: str, source: Any,
                index_meta: IndexMeta) -> torch.Tensor:
    """NEW query embeddings -> the index's space through the map; refuses a map of other models."""
    from dualenc.plugins.mapfile import MapMismatchError
    from dualenc.plugins.maps import load_map

    try:
        m = load_map(map_path, source=source, target=index_meta.model_id())
        return m.apply(vectors.double(), modality, normalize=index_meta.normalized).float()
    except MapMismatchError as e:
        raise UserError(f"--map {map_path} does not fit this search: {e}. The map must go from the query "
                        f"model to the index's model {index_meta.model!r}") from None
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--map {map_path}: {e}") from None


def search_vectors(index: Any, meta: IndexMeta, vectors: np.ndarray | torch.Tensor, k: int = 10,
                   params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, FAISS ids) of the top ``k`` for each query row; ``params`` e.g. ``"nprobe=32"``."""
    faiss = import_faiss()
    x = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != meta.dim:
        raise UserError(f"queries have shape {x.shape}, the index holds {meta.dim}-dim vectors of {meta.model!r}; "
                        "embed the queries with that model or map them into its space with --map")
    if meta.normalized:
        x = x.copy()
        faiss.normalize_L2(x)
    p = meta.search_params if params is None else params
    if p:
        try:
            faiss.ParameterSpace().set_index_parameters(index, p)
        except RuntimeError as e:
            raise UserError(f"search parameters {p!r} do not apply to a {meta.factory} index "
                            f"({str(e).strip().splitlines()[-1]}); IVF takes nprobe=N, HNSW efSearch=N") from None
    return index.search(x, min(k, meta.count))


def results(scores: np.ndarray, ids: np.ndarray, keys: Keys) -> list[list[dict[str, Any]]]:
    found = keys.get(ids)
    k = ids.shape[1]
    return [[{"key": found[r * k + j], "score": round(float(scores[r, j]), 6)}
             for j in range(k) if ids[r, j] >= 0] for r in range(len(ids))]


def search(index_dir: str, queries: torch.Tensor, modality: str, source: Any, map_path: str | None = None,
           k: int = 10, params: str | None = None, mmap: bool = False) -> list[list[dict[str, Any]]]:
    """Top-``k`` keys (with scores) of ``index_dir`` for each query embedding of model ``source``."""
    index, meta, keys = open_index(index_dir, mmap=mmap)
    if map_path:
        queries = map_queries(queries, map_path, modality, source, meta)
    else:
        check_same_model(meta, source, f"{modality} queries")
    scores, ids = search_vectors(index, meta, queries, k, params)
    return results(scores, ids, keys)
