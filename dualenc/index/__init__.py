"""On-disk FAISS vector indexes of ``dualenc embed`` directories, and search across model upgrades.

    dualenc index build --embeddings EMB_DIR --out INDEX [--factory IVF1024,PQ64]
    dualenc search --index INDEX --model NEW_EXPORT [--map NEW2OLD.safetensors] --text "a dog"
    dualenc index eval --old-images OLD_IMG --new-images NEW_IMG --old-queries OLD_TXT --new-queries NEW_TXT --map M

Needs faiss (``pip install 'dualenc[index]'``); it is imported lazily so the rest of dualenc works without it.
"""

from dualenc.index.store import INDEX_FORMAT, IndexMeta, iter_chunks, open_index

__all__ = ["INDEX_FORMAT", "IndexMeta", "iter_chunks", "open_index"]
