"""Real images as web-like training shards plus CLIP_benchmark eval sets (``dualenc-data real``).

Training shards (img2dataset layout, ``OUT/train/00000.tar``: ``key.png`` + ``key.txt``) get ALIGN-like
noisy alt-text: several phrasings per class, file-name noise, shop boilerplate and a share of wrong
captions (another seen class's). Unseen classes are left out of the training shards entirely; the eval
roots ``OUT/eval/{all,seen,unseen}`` hold the test split (``test/``) and a capped labelled subset of
the train split for linear probes (``train/``). Everything seeded and recorded in ``OUT/train/manifest.json``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dualenc.errors import UserError

from .real_sources import LabelledImages, load_source
from .writer import ShardWriter, write_json_atomic

MANIFEST = "manifest.json"
KINDS = ("clean", "filename", "boilerplate", "wrong")
EVAL_SETS = ("all", "seen", "unseen")
_SPLIT_SEED = 0  # halves are cut with this fixed seed, so --seed never makes two halves overlap

_BOILERPLATE = ["{p} | free shipping | shop now", "buy {p} online - best price", "{p} - sale {n}% off",
                "new arrivals: {p} | free returns", "{p} | add to cart", "shop {p} | official store"]


def _file_name(rng: np.random.Generator) -> str:
    n = int(rng.integers(0, 10000))
    forms = [f"IMG_{n:04d}.jpg", f"DSC{n:05d}.JPG", f"product_{n}_main.jpg", f"image{n}.png",
             f"{int(rng.integers(0, 1 << 32)):08x}.jpg"]
    return forms[rng.integers(len(forms))]


def _slug(phrase: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")


def make_caption(phrases: list[str], kind: str, rng: np.random.Generator) -> str:
    """One alt-text of ``kind`` (clean, filename or boilerplate) for a class with these ``phrases``.

    Half of the file-name captions carry no class text at all ("IMG_2034.jpg"), as web alt-text often does.
    """
    p = phrases[rng.integers(len(phrases))]
    if kind == "clean":
        return p
    if kind == "filename":
        name = _file_name(rng)
        form = int(rng.integers(3))
        return name if form == 0 else f"{_slug(p)}-{rng.integers(100, 1000)}.jpg" if form == 1 else f"{name} {p}"
    if kind == "boilerplate":
        return _BOILERPLATE[rng.integers(len(_BOILERPLATE))].format(p=p, n=int(rng.integers(2, 8)) * 10)
    raise ValueError(f"unknown caption kind {kind!r}; use one of {KINDS[:3]}")


def resolve_classes(spec: str | list[str] | None, classnames: list[str], default: tuple[str, ...]) -> list[int]:
    """Class indices from names (case, spaces, '-' and '_' ignored) or integer indices."""
    items = default if spec is None else spec.split(",") if isinstance(spec, str) else spec
    norm = {re.sub(r"[\s_-]", "", n.lower()): i for i, n in enumerate(classnames)}
    out = []
    for item in (str(x).strip() for x in items if str(x).strip()):
        key = re.sub(r"[\s_-]", "", item.lower())
        i = int(key) if key.isdigit() else norm.get(key)
        if i is None or not 0 <= i < len(classnames):
            raise UserError(f"unknown class {item!r} in --unseen; use names or indices of: {', '.join(classnames)}")
        out.append(i)
    if len(set(out)) >= len(classnames):
        raise UserError(f"--unseen names all {len(classnames)} classes; leave at least one class seen")
    return sorted(set(out))


def keyword_pattern(words: list[str]) -> re.Pattern[str]:
    """Whole words, with '-' part of a word: 'shirt' does not match inside 't-shirt'."""
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.IGNORECASE)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def train_indices(labels: np.ndarray, seen: list[int], half: int | None, per_class: int | None = None
                  ) -> np.ndarray:
    """Indices of the train split that go into training shards: seen classes, one half per class if asked,
    at most ``per_class`` of each (a prefix of a fixed order: a smaller cap is a subset of a larger one)."""
    keep = []
    rng = np.random.default_rng(_SPLIT_SEED)
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))  # drawn for every class: halves stay fixed
        if c in seen:
            mid = len(idx) // 2
            idx = idx if half is None else idx[:mid] if half == 1 else idx[mid:]
            keep.append(idx[:per_class])
    return np.sort(np.concatenate(keep))


def _write_train(out: Path, data: LabelledImages, idx: np.ndarray, seen: list[int], phrases: dict[str, list[str]],
                 probs: list[float], seed: int, shard_size: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 1])
    names = data.classnames
    kinds = {k: 0 for k in KINDS}
    wrong: dict[str, dict[str, str]] = {}
    per_class = {names[c]: 0 for c in seen}
    with ShardWriter(out, max_count=shard_size, name_format="{index:05d}.tar") as w:
        for i in rng.permutation(idx).tolist():  # shuffled once: shards mix classes
            label = int(data.train_labels[i])
            kind = KINDS[rng.choice(len(KINDS), p=probs)]
            about = label
            if kind == "wrong":  # another *seen* class, so unseen names never reach training text
                others = [c for c in seen if c != label]
                about = others[rng.integers(len(others))]
            text = make_caption(phrases[names[about]], KINDS[rng.integers(3)] if kind == "wrong" else kind, rng)
            key = f"{i:07d}"  # index in the source's train split: halves and seeds share keys
            w.write(key, _png(data.train_images[i]), text, image_ext="png")
            kinds[kind] += 1
            per_class[names[label]] += 1
            if kind == "wrong":
                wrong[key] = {"image_class": names[label], "caption_class": names[about]}
    return {"samples": w.count, "shards": [Path(p).name for p in w.shards], "per_class": per_class,
            "caption_kinds": kinds, "wrong_keys": wrong}


def _write_eval_split(d: Path, images: np.ndarray, labels: np.ndarray, classes: list[int], shard_size: int,
                      cap: int | None = None) -> dict[str, int]:
    renumber = {c: j for j, c in enumerate(classes)}
    counts = {c: 0 for c in classes}
    with ShardWriter(d, max_count=shard_size, name_format="{index}.tar") as w:
        for i, label in enumerate(labels.tolist()):
            if label in renumber and (cap is None or counts[label] < cap):  # first `cap` per class: no seed
                counts[label] += 1
                w.write(f"s{i:07d}", _png(images[i]), image_ext="png", extra={"cls": renumber[label]})
    (d / "nshards.txt").write_text(f"{len(w.shards)}\n")  # CLIP_benchmark reads {0..n-1}.tar from it
    return {"samples": w.count, "shards": len(w.shards)}


def _write_eval_sets(out: Path, data: LabelledImages, seen: list[int], unseen: list[int], probe_per_class: int,
                     shard_size: int) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    for name, classes in (("all", list(range(len(data.classnames)))), ("seen", seen), ("unseen", unseen)):
        if not classes:  # --unseen "" : no unseen set to write
            continue
        root = out / name
        sets[name] = {
            "classnames": [data.classnames[c] for c in classes],
            "test": _write_eval_split(root / "test", data.test_images, data.test_labels, classes, shard_size),
            "train": _write_eval_split(root / "train", data.train_images, data.train_labels, classes, shard_size,
                                       cap=probe_per_class),
        }
        (root / "classnames.txt").write_text("\n".join(sets[name]["classnames"]) + "\n", encoding="utf-8")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(data.templates) + "\n",
                                                                     encoding="utf-8")
    return sets


def build_real(
    out_dir: str | os.PathLike,
    *,
    source: str = "fixture",
    idx_dir: str | os.PathLike | None = None,
    unseen: str | list[str] | None = None,
    half: int | None = None,
    train_per_class: int | None = None,
    phrasing_set: str = "a",
    seed: int = 0,
    wrong_rate: float = 0.1,
    filename_rate: float = 0.15,
    boilerplate_rate: float = 0.15,
    probe_train_per_class: int = 1000,
    shard_size: int = 5000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build training shards, eval roots and the manifest under ``out_dir``; returns the manifest.

    Built in a hidden sibling folder and renamed into place, so an interrupted build leaves nothing.
    """
    rates = {"wrong": wrong_rate, "filename": filename_rate, "boilerplate": boilerplate_rate}
    for name, r in rates.items():
        if not 0.0 <= r < 1.0:
            raise UserError(f"--{name}-rate must be in [0, 1), got {r}")
    if sum(rates.values()) >= 1.0:
        raise UserError(f"--wrong-rate + --filename-rate + --boilerplate-rate = {sum(rates.values()):.2f}; "
                        "keep the sum below 1 so some captions are clean")
    if half not in (None, 1, 2):
        raise UserError(f"--half must be 1 or 2 (or left out for the whole train split), got {half}")
    if probe_train_per_class < 1 or shard_size < 1 or (train_per_class is not None and train_per_class < 1):
        raise UserError("--train-per-class, --probe-train-per-class and --shard-size must be >= 1")
    out = Path(out_dir)
    _check_target(out, overwrite)
    data = load_source(source, idx_dir)
    if phrasing_set not in data.phrases:
        raise UserError(f"unknown --phrasing-set {phrasing_set!r}; use one of {', '.join(data.phrases)}")
    unseen_idx = resolve_classes(unseen, data.classnames, data.default_unseen)
    seen_idx = [c for c in range(len(data.classnames)) if c not in unseen_idx]
    if len(seen_idx) < 2 and wrong_rate > 0:
        raise UserError("wrong captions need two seen classes; pass --wrong-rate 0 or fewer --unseen classes")
    probs = [1 - sum(rates.values()), filename_rate, boilerplate_rate, wrong_rate]  # KINDS order
    phrases = data.phrases[phrasing_set]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        idx = train_indices(data.train_labels, seen_idx, half, train_per_class)
        train = _write_train(tmp / "train", data, idx, seen_idx, phrases, probs, seed, shard_size)
        evals = _write_eval_sets(tmp / "eval", data, seen_idx, unseen_idx, probe_train_per_class, shard_size)
        manifest = {
            "source": source, "origin": data.origin, "seed": seed, "half": half, "split_seed": _SPLIT_SEED,
            "train_per_class": train_per_class,
            "phrasing_set": phrasing_set, "classnames": data.classnames,
            "seen": [data.classnames[c] for c in seen_idx], "unseen": [data.classnames[c] for c in unseen_idx],
            "rates": dict(zip(KINDS, probs)), "phrases": {data.classnames[c]: phrases[data.classnames[c]]
                                                          for c in seen_idx},
            "keywords": data.keywords, "templates": data.templates, "image_format": "png (greyscale)",
            "train": train, "eval": evals,
        }
        write_json_atomic(tmp / "train" / MANIFEST, manifest)
        _check_target(out, overwrite)  # may have appeared while building
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace an earlier build or choose another --out")
    if not (out / "train" / MANIFEST).is_file():
        raise FileExistsError(f"{out} is not empty and has no train/{MANIFEST}, so it is not an earlier "
                              "`dualenc-data real` build; refusing to delete it. Choose another --out")
