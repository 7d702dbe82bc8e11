"""Write the shipped Fashion-MNIST subset (``data_tools/assets/fashion_mnist_subset.npz``) from the IDX files.

    python bench/make_fmnist_fixture.py                    # Debian's /usr/share/datasets/fashion-mnist
    python bench/make_fmnist_fixture.py --idx-dir DIR      # or any folder with the four IDX files

Takes a seeded sample of 200 train and 100 test images per class (3,000 uint8 28x28 images), kept in
source order, so ``dualenc-data real --source fixture`` and the tests run on real images with no root
and no download. Stores the source indices too, so every image traces back to the full set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from dualenc.data_tools.real_sources import FIXTURE, load_fashion_idx


def sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of each class, drawn without replacement, returned in source order."""
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--idx-dir", help="folder with the four Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(FIXTURE))
    a = p.parse_args(argv)
    data = load_fashion_idx(a.idx_dir)
    rng = np.random.default_rng(a.seed)
    tr = sample(data.train_labels, a.train_per_class, rng)
    te = sample(data.test_labels, a.test_per_class, rng)
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, train_images=data.train_images[tr], train_labels=data.train_labels[tr].astype(np.uint8),
                        test_images=data.test_images[te], test_labels=data.test_labels[te].astype(np.uint8),
                        train_index=tr.astype(np.int32), test_index=te.astype(np.int32), seed=np.int64(a.seed))
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {len(tr)} train + {len(te)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
