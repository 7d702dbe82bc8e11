"""Evaluation data in, embeddings out: shards or image folders, split by rank, encoded in memory."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from dualenc.data.datamodule import eval_loader
from dualenc.data.sources import expand_urls
from dualenc.eval.imagefolder import image_folder_loader
from dualenc.eval.layout import benchmark_split, is_benchmark_root
from dualenc.model import DualEncoder
from dualenc.progress import progress

FORMATS = ("auto", "wds", "folder")


def is_image_folder(data: str | Path) -> bool:
    """A directory without ``.tar`` shards in it (and not a CLIP_benchmark root) is read as an image folder."""
    p = Path(str(data))
    return p.is_dir() and not any(p.glob("*.tar")) and not is_benchmark_root(p)


def shard_urls(data: str, split: str = "test") -> list[str]:
    """The shards of ``data``: a CLIP_benchmark root's ``split`` (in its order), or a shard spec."""
    if is_benchmark_root(data):
        return benchmark_split(data, split).shards
    return expand_urls(data)


def eval_batches(data: str, data_config: dict[str, Any], batch_size: int = 256, num_workers: int = 2,
                 labels: bool = True, captions: bool = False, rank: int = 0, world: int = 1,
                 fmt: str = "auto", caption_key: str = "txt", label_key: str = "cls",
                 split: str = "test") -> Iterable[dict[str, Any]]:
    """Ordered batches of this rank's part of ``data`` (shard spec, CLIP_benchmark root or image folder).

    Shards are split between ranks whole (``urls[rank::world]``), image folders image by image; a rank
    may get nothing. Batches hold ``image``, ``key`` and, as asked, ``label`` / ``text``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "folder" or (fmt == "auto" and is_image_folder(data)):
        if captions:
            raise ValueError(f"{data} is an image folder, which has no captions; retrieval needs shards with "
                             f".{caption_key} captions (one caption per line)")
        return image_folder_loader(data, data_config, batch_size, num_workers, labelled=labels, rank=rank, world=world)
    urls = shard_urls(data, split)[rank::world]
    if not urls:
        return []
    return eval_loader(urls, data_config, batch_size, num_workers, label_key=label_key if labels else None,
                       caption_key=caption_key if captions else None)


def split_captions(text: str | None) -> list[str]:
    """CLIP_benchmark's caption files hold one caption per line."""
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


@dataclass
class EncodedImages:
    embeddings: Tensor  # (N, D) float32 on CPU, L2-normalized
    keys: list[str]
    labels: Tensor | None = None  # (N,) long
    captions: list[list[str]] | None = None  # per image, one entry per caption
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


@torch.no_grad()
def encode_images(model: DualEncoder, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu",
                  labels: bool = False, captions: bool = False, name: str = "evaluation set",
                  allow_empty: bool = False, show_progress: bool = False,
                  total: int | None = None) -> EncodedImages:
    """Embed every image of ``batches``; keeps keys, and labels / split captions if asked.

    ``show_progress``: a bar (``dualenc.progress``) counting images, out of ``total`` if known."""
    embs: list[Tensor] = []
    keys: list[str] = []
    labs: list[Tensor] = []
    caps: list[list[str]] = []
    worker_skips: dict[int, dict[str, int]] = {}
    bad_files: list[str] = []
    bar = progress(total=total, desc=f"embedding {name}", unit="image", disable=not show_progress or None)
    for batch in batches:
        bar.update(len(batch.get("key") or []) + len(batch.get("skipped_keys", [])))
        bad_files += batch.get("skipped_keys", [])
        worker_skips[batch.get("worker", 0)] = batch.get("skipped", {})  # cumulative per worker
        if "image" not in batch:
            continue
        embs.append(model.encode_image(batch["image"].to(device)).float().cpu())
        keys += [str(k) for k in batch["key"]]
        if labels:
            labs.append(batch["label"].long().cpu())
        if captions:
            caps += [split_captions(t) for t in batch["text"]]
    bar.close()
    skipped = Counter()
    for counts in worker_skips.values():
        skipped.update(counts)
    if bad_files:
        skipped["unreadable_image"] += len(bad_files)
        warnings.warn(f"{name}: skipped {len(bad_files)} unreadable image(s), e.g. {bad_files[:3]}", stacklevel=2)
    if not embs and not allow_empty:
        why = (f"skipped: {dict(skipped)}" if skipped
               else "no sample, or none with a readable image and the needed members")
        raise ValueError(f"{name} is empty: no image was read ({why}); check the path, the file types and, for "
                         "shards, the .cls / .txt members")
    dim = int(model.embed_dim)
    return EncodedImages(
        embeddings=torch.cat(embs) if embs else torch.empty(0, dim),
        keys=keys,
        labels=(torch.cat(labs) if labs else torch.empty(0, dtype=torch.long)) if labels else None,
        captions=caps if captions else None,
        skipped=dict(skipped),
    )


@torch.no_grad()
def encode_texts(model: DualEncoder, tokenize: Callable[[list[str]], dict[str, Tensor]], texts: list[str],
                 device: torch.device | str = "cpu", batch_size: int = 256, show_progress: bool = False) -> Tensor:
    """(M, D) float32 normalized text embeddings on CPU."""
    out = [torch.empty(0, int(model.embed_dim))]
    steps = range(0, len(texts), batch_size)
    for i in progress(steps, desc="embedding texts", unit="batch", disable=not show_progress or None):
        enc = tokenize(texts[i : i + batch_size])
        out.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
    return torch.cat(out)


def flatten_captions(captions: list[list[str]]) -> tuple[list[str], Tensor]:
    """(all captions, caption -> image index) for :func:`dualenc.eval.retrieval.retrieval_metrics`."""
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)
    return texts, owner
