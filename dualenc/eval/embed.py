"""Build an embeddings directory (for an index) from shards, an image folder or a text file, resumably.

Each output shard comes from a fixed slice of the input (one input tar, or ``shard_size`` files /
lines), so a rerun skips the finished ones without reading their input again.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dualenc.data.datamodule import eval_loader
from dualenc.data.sources import REMOTE_PREFIXES, expand_urls
from dualenc.data.tario import iter_samples
from dualenc.eval.encode import encode_texts, is_image_folder, split_captions
from dualenc.eval.imagefolder import image_folder_loader, list_images
from dualenc.eval.store import EmbeddingWriter
from dualenc.model import DualEncoder
from dualenc.progress import progress

SOURCES = ("auto", "shards", "folder", "textfile")


def source_type(src: str, kind: str) -> str:
    """``shards`` (tar spec), ``folder`` (images) or ``textfile`` (one text per line)."""
    p = Path(src)
    if kind == "image":
        return "folder" if is_image_folder(src) else "shards"
    if p.is_file() and not str(src).endswith(".tar"):
        return "textfile"
    if p.is_dir() and not any(p.glob("*.tar")):
        raise ValueError(f"{src} is a directory without .tar shards; texts come from shards (their captions) "
                         "or a text file with one text per line")
    return "shards"


def _abs(src: str) -> str:
    # Record local paths absolutely so a rerun from another directory still resumes.
    return src if src.startswith(REMOTE_PREFIXES) else "::".join(os.path.abspath(s) for s in src.split("::"))


def _groups(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@torch.no_grad()
def embed_to_dir(model: DualEncoder, src: str, out_dir: str | Path, kind: str, model_name: str,
                 source: str = "auto", batch_size: int = 256, num_workers: int = 2, shard_size: int = 10000,
                 file_format: str = "npy", caption_key: str = "txt", overwrite: bool = False,
                 device: torch.device | str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed ``src`` into ``out_dir``; returns the finished manifest.

    ``kind="image"``: shards (``.jpg``... members; id = sample key) or an image folder (id = relative
    path). ``kind="text"``: shards (each caption line; id = ``key#j``) or a text file (id = line number).
    """
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    stype = source_type(src, kind) if source == "auto" else source
    if stype not in SOURCES[1:]:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    params = {"source_type": stype}
    if stype in ("folder", "textfile"):
        params["shard_size"] = shard_size
    if stype == "shards" and kind == "text":
        params["caption_key"] = caption_key
    writer = EmbeddingWriter(out_dir, kind, model_name, _abs(src), file_format, params=params, overwrite=overwrite)
    model = model.to(device).eval()
    units = _units(src, stype, shard_size)
    todo = [u for u in units if not writer.done(u[0])]
    if len(todo) < len(units):
        log(f"skipping {len(units) - len(todo)} finished shard(s) in {out_dir}")
    bar = progress(total=len(todo), desc=f"embed {kind}s", unit="shard")
    if stype == "shards" and kind == "image":
        _embed_image_shards(model, todo, writer, batch_size, num_workers, device, log, bar)
    elif stype == "folder":
        for name, files in todo:
            loader = image_folder_loader(src, model.image_tower.data_config, batch_size, num_workers,
                                         labelled=False, files=files)
            embs, ids, bad = [], [], []
            for batch in loader:
                bad += batch["skipped_keys"]
                if batch["key"]:
                    embs.append(model.encode_image(batch["image"].to(device)).float().cpu())
                    ids += batch["key"]
            _write(writer, name, embs, ids, model, {"skipped": {"unreadable_image": len(bad)}} if bad else {}, log)
            bar.update(1)
    else:
        tokenize = model.text_tower.tokenizer_fn()
        for name, part in todo:
            info: dict[str, Any] = {}
            if stype == "shards":
                texts, ids, skipped = _captions(part, caption_key)
                info = {"source": part, **({"skipped": skipped} if skipped else {})}
            else:
                texts, ids = part
            embs = [encode_texts(model, tokenize, texts, device, batch_size)] if texts else []
            _write(writer, name, embs, ids, model, info, log)
            bar.update(1)
    bar.close()
    manifest = writer.finish()
    if manifest["count"] == 0:
        raise ValueError(f"nothing was embedded from {src}: every sample was skipped or empty")
    return manifest


def _units(src: str, stype: str, shard_size: int) -> list[tuple[str, Any]]:
    """(output shard name, its slice of the input) in order."""
    if stype == "shards":
        return [(f"emb-{i:05d}", url) for i, url in enumerate(expand_urls(src))]
    if stype == "folder":
        files = list_images(src)
        if not files:
            raise ValueError(f"image folder {src!r} holds no image")
        return [(f"emb-{i:05d}", chunk) for i, chunk in enumerate(_groups(files, shard_size))]
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"text file {src!r} does not exist")
    numbered = enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
    lines = [(str(n), ln.strip()) for n, ln in numbered if ln.strip()]
    if not lines:
        raise ValueError(f"text file {src!r} has no non-empty line to embed")
    return [(f"emb-{i:05d}", ([t for _, t in chunk], [n for n, _ in chunk]))
            for i, chunk in enumerate(_groups(lines, shard_size))]


def _captions(url: str, caption_key: str) -> tuple[list[str], list[str], dict[str, int]]:
    """Every caption line of one shard, with ids ``key#j``, through the one shard reader (images are
    never read); non-UTF-8 captions, duplicate members and keys are skipped and counted."""
    texts, ids = [], []
    skipped: Counter[str] = Counter()
    for sample in iter_samples(url, lambda name: name.lower().endswith(f".{caption_key}"), skipped):
        raw = sample.get(caption_key)
        if raw is None:
            skipped["missing_caption"] += 1
            continue
        try:
            caption = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["non_utf8_caption"] += 1
            continue
        for j, cap in enumerate(split_captions(caption)):
            texts.append(cap)
            ids.append(f"{sample['__key__']}#{j}")
    return texts, ids, dict(skipped)


def _embed_image_shards(model: DualEncoder, todo: list[tuple[str, str]], writer: EmbeddingWriter, batch_size: int,
                        num_workers: int, device: torch.device | str, log: Callable[[str], None],
                        bar: Any = None) -> None:
    # One loader per group of as many shards as workers: webdataset hands worker i exactly shard i,
    # and batches never mix workers, so a batch's worker id says which output shard it belongs to.
    for group in _groups(todo, max(1, num_workers)):
        loader = eval_loader([url for _, url in group], model.image_tower.data_config, batch_size,
                             num_workers, label_key=None, caption_key=None)
        embs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(group))}
        ids: dict[int, list[str]] = {i: [] for i in range(len(group))}
        skipped: dict[int, dict[str, int]] = {}
        for batch in loader:
            w = batch["worker"]
            embs[w].append(model.encode_image(batch["image"].to(device)).float().cpu())
            ids[w] += [str(k) for k in batch["key"]]
            skipped[w] = batch["skipped"]
        for i, (name, url) in enumerate(group):
            info = {"source": url, **({"skipped": skipped[i]} if skipped.get(i) else {})}
            _write(writer, name, embs[i], ids[i], model, info, log)
        if bar is not None:
            bar.update(len(group))


def _write(writer: EmbeddingWriter, name: str, embs: list[torch.Tensor], ids: list[str], model: DualEncoder,
           info: dict[str, Any], log: Callable[[str], None]) -> None:
    vec = torch.cat(embs) if embs else torch.empty(0, int(model.embed_dim))
    writer.write(name, vec, ids, info)
    log(f"wrote {name}: {len(ids)} vectors")
