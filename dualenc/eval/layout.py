"""CLIP_benchmark's published webdataset layout, read as its own builder reads it.

::

    root/
        train/ nshards.txt 0.tar 1.tar ...
        test/  nshards.txt 0.tar 1.tar ...
        classnames.txt                           (classification)
        zeroshot_classification_templates.txt    (classification)
        dataset_type.txt                         (optional: "retrieval", "multilabel"; default classification)

Images are ``.webp``/``.png``/``.jpg``/``.jpeg`` members, labels ``.cls``, captions ``.txt`` (one per
line). CLIP_benchmark reads ``{0..nshards-1}.tar`` in that numeric order, which matters for retrieval:
its top-k lists break score ties by index, so the image order must be the same to agree with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dualenc.errors import UserError

SPLITS = ("test", "train")
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"


@dataclass
class BenchmarkSplit:
    root: Path
    split: str
    shards: list[str]  # in CLIP_benchmark's order
    dataset_type: str  # classification, retrieval or multilabel

    @property
    def classnames_file(self) -> Path:
        return self.root / CLASSNAMES

    @property
    def templates_file(self) -> Path:
        return self.root / TEMPLATES


def _split_dir_has_shards(d: Path) -> bool:
    return d.is_dir() and ((d / "nshards.txt").is_file() or any(d.glob("*.tar")))


def is_benchmark_root(data: str | Path) -> bool:
    """A directory with no ``.tar`` of its own but a ``train/`` or ``test/`` folder of shards."""
    p = Path(str(data))
    if not p.is_dir() or any(p.glob("*.tar")):
        return False
    return any(_split_dir_has_shards(p / s) for s in SPLITS)


def _numeric_order(paths: list[Path]) -> list[Path]:
    # "10.tar" after "9.tar", as CLIP_benchmark's {0..n-1} pattern reads them.
    def key(p: Path) -> tuple[int, int | str]:
        return (0, int(p.stem)) if re.fullmatch(r"\d+", p.stem) else (1, p.stem)

    return sorted(paths, key=key)


def benchmark_split(root: str | Path, split: str = "test") -> BenchmarkSplit:
    """The shards of ``root/split`` (from ``nshards.txt`` when present) and the dataset's metadata."""
    root = Path(str(root))
    d = root / split
    if not _split_dir_has_shards(d):
        have = [s for s in SPLITS if _split_dir_has_shards(root / s)]
        raise UserError(f"{root} has no split {split!r} ({d} holds no .tar shards); splits here: "
                        f"{', '.join(have) or 'none'}. Pass --split {have[0] if have else 'test'}.")
    n_file = d / "nshards.txt"
    if n_file.is_file():
        try:
            n = int(n_file.read_text().strip())
        except ValueError:
            raise UserError(f"{n_file} must hold the number of shards (an integer), got "
                            f"{n_file.read_text()[:40]!r}") from None
        shards = [d / f"{i}.tar" for i in range(n)]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise UserError(f"{n_file} says {n} shards but {d} lacks {', '.join(missing[:5])}; fix nshards.txt "
                            "or restore the shards")
    else:
        shards = _numeric_order(list(d.glob("*.tar")))
    type_file = root / "dataset_type.txt"
    kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    return BenchmarkSplit(root, split, [str(p) for p in shards], kind or "classification")
