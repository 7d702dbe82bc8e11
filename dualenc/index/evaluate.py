"""``dualenc index eval``: recall of the three upgrade options, on exact and compressed indexes.

For held-out queries whose answer is known (a caption ``KEY#j`` answers to image ``KEY``; any other
query id answers to the item with the same key), and for each index factory:

- ``new->new``: NEW queries on an index of NEW embeddings (re-embedding everything: the cost to avoid)
- ``new->old (map)``: NEW queries moved through the map into the OLD index (the upgrade path)
- ``new->old (identity)``: NEW queries on the OLD index as they are (what happens without a map)
- ``old->old``: OLD queries on the OLD index (the status quo)

Indexes are built with the same code as ``dualenc index build`` (into a temporary directory unless
``--keep`` names one) and searched with the same code as ``dualenc search``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dualenc.errors import UserError
from dualenc.index.build import build_index, default_compressed_factory, model_identity
from dualenc.index.search import map_queries, search_vectors
from dualenc.index.store import load_manifest, open_index


def _queries(path: str, model: str | None) -> tuple[torch.Tensor, list[str], Any, str]:
    from dualenc.eval.store import load_embeddings
    from dualenc.plugins.mapfile import ModelId

    manifest = load_manifest(path)
    data = load_embeddings(path)
    name, fp = model_identity(manifest, model)
    return data.tensor(), data.ids, ModelId(name, data.dim, fp), manifest["kind"]


def answers(query_ids: Sequence[str], keys: set[str]) -> list[str]:
    """The key each query should find: ``KEY`` for a caption ``KEY#j``, else the query's own id."""
    out, missing = [], []
    for q in query_ids:
        key = q.rsplit("#", 1)[0] if "#" in q and q not in keys else q
        (out if key in keys else missing).append(key)
    if missing:
        raise UserError(f"{len(missing)} query id(s) have no answer in the index, e.g. {missing[:3]}; queries must "
                        "be captions KEY#j of indexed images (as `dualenc embed --texts SHARDS` writes) or items "
                        "with the same keys as the indexed ones")
    return out


def recall(found: list[list[str | None]], truth: list[str], ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": round(float(np.mean([t in f[:k] for f, t in zip(found, truth)])), 4) for k in ks}


def evaluate(old_images: str, new_images: str, old_queries: str, new_queries: str, map_path: str,
             factories: Sequence[str] = ("Flat", "auto"), ks: Sequence[int] = (1, 10), old_model: str | None = None,
             new_model: str | None = None, params: str | None = None, work_dir: str | None = None,
             chunk_rows: int = 65536) -> dict[str, Any]:
    """The recall table (``{factory: {option: {"R@k": ...}}}``) and what it was computed on."""
    qn, ids_n, new_id, qkind = _queries(new_queries, new_model)
    qo, ids_o, old_id, qkind_o = _queries(old_queries, old_model)
    if ids_n != ids_o:
        raise UserError(f"{new_queries} and {old_queries} hold different queries; embed the same held-out queries "
                        "with both models")
    modality = qkind
    ctx = tempfile.TemporaryDirectory(prefix="dualenc-index-eval-") if work_dir is None else None
    root = Path(ctx.name if ctx else work_dir)
    k = max(ks)
    report: dict[str, Any] = {"queries": len(ids_n), "query_kind": qkind, "map": str(map_path),
                              "old_model": old_id.name, "new_model": new_id.name, "indexes": {}}
    try:
        count = int(load_manifest(old_images)["count"])
        for factory in factories:
            fac = default_compressed_factory(count, qo.shape[1]) if factory == "auto" else factory
            tag = fac.replace(",", "_")
            metas = {}
            for side, src, mdl in (("old", old_images, old_model), ("new", new_images, new_model)):
                metas[side] = build_index(src, root / f"{side}-{tag}", factory=fac, model=mdl, overwrite=True,
                                          chunk_rows=chunk_rows, log=lambda s: None).factory
            old_ix, old_meta, old_keys = open_index(root / f"old-{tag}")
            new_ix, new_meta, new_keys = open_index(root / f"new-{tag}")
            truth = answers(ids_n, set(old_keys.get(np.arange(old_meta.count))))

            def run(ix: Any, meta: Any, keys: Any, q: torch.Tensor) -> dict[str, float]:
                _, found = search_vectors(ix, meta, q, k, params)
                kk = found.shape[1]
                flat = keys.get(found)
                return recall([flat[r * kk:(r + 1) * kk] for r in range(len(found))], truth, ks)

            rows = {"new->new": run(new_ix, new_meta, new_keys, qn),
                    "new->old (map)": run(old_ix, old_meta, old_keys,
                                          map_queries(qn, map_path, modality, new_id, old_meta))}
            if qn.shape[1] == old_meta.dim:
                rows["new->old (identity)"] = run(old_ix, old_meta, old_keys, qn)
            rows["old->old"] = run(old_ix, old_meta, old_keys, qo)
            report["indexes"][fac] = {"search_params": params if params is not None else old_meta.search_params,
                                      "count": old_meta.count, "recall": rows}
    finally:
        if ctx:
            ctx.cleanup()
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['queries']} {report['query_kind']} queries; NEW = {report['new_model']}, "
             f"OLD = {report['old_model']}"]
    for fac, res in report["indexes"].items():
        ks = list(next(iter(res["recall"].values())))
        lines.append(f"\nindex {fac} ({res['count']} vectors{', ' + res['search_params'] if res['search_params'] else ''})")
        lines.append(f"  {'option':<22}" + "".join(f"{k:>8}" for k in ks))
        for opt, r in res["recall"].items():
            lines.append(f"  {opt:<22}" + "".join(f"{r[k]:>8.3f}" for k in ks))
    return "\n".join(lines)
