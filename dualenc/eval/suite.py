"""Several evaluation sets run together; under DDP every rank embeds a disjoint part, rank 0 scores.

Each set's embeddings (and labels / caption owners) are gathered once with padded all-gathers,
rank 0 computes the metrics and broadcasts them, so every rank returns (and may log) the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from dualenc.distributed import world_info
from dualenc.eval.encode import (EncodedImages, encode_images, encode_texts, eval_batches, flatten_captions,
                                 is_image_folder, shard_urls)
from dualenc.eval.gather import all_ok, broadcast_values, gather_rows, gather_strings, row_offset
from dualenc.eval.imagefolder import folder_classnames
from dualenc.eval.imagesets import KnnSet, LinearProbeSet, by_key
from dualenc.errors import UserError
from dualenc.eval.imagenet import BUILTIN, load_classnames, load_templates
from dualenc.eval.layout import CLASSNAMES, TEMPLATES, is_benchmark_root
from dualenc.eval.retrieval import DEFAULT_IMAGE_CHUNK, DEFAULT_TEXT_CHUNK
from dualenc.eval.topk_recall import DEFAULT_TIES, retrieval_report
from dualenc.eval.zeroshot import build_classifier, check_templates, zeroshot_metrics
from dualenc.model import DualEncoder

ZEROSHOT_KEYS = ("top1", "top5", "mean_per_class_recall")
CURVE_KS = (1, 2, 5, 10, 20, 50, 100)


def data_folder(data: str) -> Path:
    """The directory holding a dataset's lists: a CLIP_benchmark root itself, else the folder of a shard
    spec's files (where classnames.txt sits beside flat shards)."""
    first = Path(str(data).split("::")[0])
    return first if first.is_dir() else first.parent


NO_TEMPLATES = ("no prompt templates for {data}: no {file} in {folder}. CLIP_benchmark stops here too "
                "('Templates not specified'); give --templates FILE (one template with {{c}} per line) or "
                "--templates imagenet for CLIP's 80 ImageNet templates")


def prompt_sources(data: str, classnames: str | list[str] | None, templates: str | list[str] | None,
                   fmt: str = "auto") -> tuple[list[str], list[str], str, str]:
    """Class names, templates and where each came from (for the log and the result JSON).

    Defaults follow CLIP_benchmark's webdataset builder: ``classnames.txt`` and
    ``zeroshot_classification_templates.txt`` in the dataset root (a CLIP_benchmark ``root/`` with
    ``test/``/``train/`` shards, or the folder of flat shards); an image folder's class names are its
    subfolders. Missing templates are an error, as in CLIP_benchmark: CLIP's 80 ImageNet templates are
    used only when asked for (``imagenet``), never silently.
    """
    folder = data_folder(data)
    if isinstance(classnames, list):
        names, names_src = list(classnames), "given list"
    elif classnames is not None:
        names, names_src = load_classnames(classnames), str(classnames)
    elif not is_benchmark_root(data) and (fmt == "folder" or (fmt == "auto" and is_image_folder(data))):
        names, names_src = folder_classnames(data), f"class folders of {data}"
    elif (folder / CLASSNAMES).is_file():
        names, names_src = load_classnames(folder / CLASSNAMES), str(folder / CLASSNAMES)
    else:
        raise UserError(f"no class names for {data}: no {CLASSNAMES} in {folder}; give a file (--classnames / "
                        "classnames:) with one name per class index, or 'imagenet'")
    if isinstance(templates, list):
        temps, temps_src = list(templates), "given list"
        check_templates(temps)
    elif templates is not None:
        temps = load_templates(templates)
        temps_src = "CLIP's ImageNet templates" if str(templates) == BUILTIN and not Path(templates).exists() \
            else str(templates)
    elif (folder / TEMPLATES).is_file():
        temps, temps_src = load_templates(folder / TEMPLATES), str(folder / TEMPLATES)
    else:
        raise UserError(NO_TEMPLATES.format(data=data, file=TEMPLATES, folder=folder))
    if not names:
        raise UserError(f"no class names for {data}")
    return names, temps, names_src, temps_src


def resolve_prompts(data: str, classnames: str | list[str] | None, templates: str | list[str] | None,
                    fmt: str = "auto") -> tuple[list[str], list[str]]:
    """Class names and templates for ``data`` (see :func:`prompt_sources`)."""
    return prompt_sources(data, classnames, templates, fmt)[:2]


@dataclass
class ZeroShotSet:
    """A labelled image set: shards (``.cls`` labels) or an image folder (class per subfolder).

    Nothing is read when the set is built (a training config may name eval data that a later step
    creates); :meth:`EvalSuite.check` reads class names and templates, and the callback calls it
    when fit starts, so a bad set still fails before the first training step."""

    name: str
    data: str
    classnames: str | list[str] | None = None
    templates: str | list[str] | None = None
    format: str = "auto"
    split: str = "test"  # of a CLIP_benchmark root (root/test/*.tar)

    @cached_property
    def sources(self) -> tuple[list[str], list[str], str, str]:
        """(class names, templates, where each came from)."""
        return prompt_sources(self.data, self.classnames, self.templates, self.format)

    @property
    def prompts(self) -> tuple[list[str], list[str]]:
        return self.sources[0], self.sources[1]

    def check(self) -> None:
        folder = self.format == "folder" or (self.format == "auto" and is_image_folder(self.data))
        if not folder:
            shard_urls(self.data, self.split)
        _ = self.prompts  # resolves (and caches) class names and templates, raising if bad

    def keys(self) -> list[str]:
        return [f"{self.name}/{k}" for k in ZEROSHOT_KEYS]


@dataclass
class RetrievalSet:
    """Image/caption shards; each sample's caption member may hold several captions, one per line."""

    name: str
    data: str
    caption_key: str = "txt"
    ks: tuple[int, ...] = (1, 5, 10)
    ties: str = DEFAULT_TIES  # clip_benchmark, optimistic or pessimistic: see dualenc.eval.topk_recall
    split: str = "test"  # of a CLIP_benchmark root (root/test/*.tar)

    def check(self) -> None:
        shard_urls(self.data, self.split)

    def keys(self) -> list[str]:
        metrics = [f"{d}_recall@{k}" for d in ("image_retrieval", "text_retrieval") for k in self.ks]
        metrics += [f"{d}_{s}_rank" for d in ("image_retrieval", "text_retrieval") for s in ("mean", "median")]
        return [f"{self.name}/{m}" for m in metrics]


def _named(s: Any, err: BaseException) -> BaseException:
    """``err`` with the set's name in front (once), keeping its type where it is a plain ValueError etc."""
    prefix = f"evaluation set {s.name!r}"
    if str(err).startswith(prefix):
        return err
    try:
        named = type(err)(f"{prefix}: {err}")
    except Exception:  # noqa: BLE001 - exception types with other constructors
        named = ValueError(f"{prefix}: {err}")
    named.__cause__ = err
    return named


def _as_set(cls: type, cfg: Any) -> Any:
    if isinstance(cfg, cls):
        return cfg
    if not isinstance(cfg, dict) or "name" not in cfg or "data" not in cfg:
        raise ValueError(f"each {cls.__name__} entry needs at least 'name' and 'data', got {cfg!r}")
    return cls(**cfg)


class EvalSuite:
    """Zero-shot, retrieval, linear-probe and kNN sets evaluated together (see :meth:`run`).

    Args:
        zeroshot: ``ZeroShotSet`` objects or dicts (``name``, ``data``, optional ``classnames``,
            ``templates`` (file paths, lists or ``imagenet``), ``format``).
        retrieval: ``RetrievalSet`` objects or dicts (``name``, ``data``, optional ``caption_key``, ``ks``,
            ``ties``).
        batch_size / num_workers: per rank, for reading and embedding.
        linear_probe / knn: ``LinearProbeSet`` / ``KnnSet`` objects or dicts (``name``, ``data`` (a
            CLIP_benchmark root with train and test splits), optional settings: see
            ``dualenc.eval.imagesets``).
    """

    def __init__(self, zeroshot: list[Any] | None = None, retrieval: list[Any] | None = None, batch_size: int = 256,
                 num_workers: int = 2, image_chunk: int = DEFAULT_IMAGE_CHUNK,
                 text_chunk: int = DEFAULT_TEXT_CHUNK, linear_probe: list[Any] | None = None,
                 knn: list[Any] | None = None) -> None:
        self.zeroshot = [_as_set(ZeroShotSet, c) for c in zeroshot or []]
        self.retrieval = [_as_set(RetrievalSet, c) for c in retrieval or []]
        self.image_sets = ([_as_set(LinearProbeSet, c) for c in linear_probe or []]
                           + [_as_set(KnnSet, c) for c in knn or []])
        names = [s.name for s in self.zeroshot + self.retrieval + self.image_sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation set names must be unique (they name the metrics); repeated: {dupes}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.image_chunk, self.text_chunk = image_chunk, text_chunk
        self.records: list[dict[str, Any]] = []  # rank 0: the last run's per-set results, with details

    def keys(self) -> list[str]:
        return [k for s in self.zeroshot + self.retrieval + self.image_sets for k in s.keys()]

    def check(self) -> None:
        """Read what every set needs up front (shard lists, class names, templates); raise naming the set."""
        for s in self.zeroshot + self.retrieval + self.image_sets:
            try:
                s.check()
            except Exception as e:  # noqa: BLE001 - re-raised with the set's name
                raise _named(s, e) from e

    @torch.no_grad()
    def run(self, model: DualEncoder, device: torch.device | str = "cpu") -> dict[str, float]:
        """Evaluate every set; a collective under DDP (all ranks call it). Same result on every rank."""
        self.records = []
        out: dict[str, float] = {}
        for s in self.zeroshot:
            out.update(self._one(s, lambda: self._zeroshot(s, model, device)))
        for r in self.retrieval:
            out.update(self._one(r, lambda: self._retrieval(r, model, device)))
        for t in self.image_sets:
            out.update(self._one(t, lambda: self._image_tower(t, model, device)))
        return out

    def _one(self, s: Any, compute: Callable[[], dict[str, float] | None]) -> dict[str, float]:
        error: BaseException | None = None
        values = None
        try:
            metrics = compute()  # None on ranks other than 0
            if metrics is not None:
                values = [float(metrics[k.split("/", 1)[1]]) for k in s.keys()]
        except Exception as e:  # noqa: BLE001 - re-raised below once every rank knows
            error = e
        values = broadcast_values(values, len(s.keys()))
        if error is not None:
            raise _named(s, error)
        if values is None:
            raise RuntimeError(f"evaluation set {s.name!r} failed on rank 0; see its error")
        return dict(zip(s.keys(), values))

    def _local(self, s: Any, encode: Callable[[], Any]) -> Any:
        # Every rank must reach the gathers; if one fails to read its part, all stop together.
        try:
            result, err = encode(), None
        except Exception as e:  # noqa: BLE001
            result, err = None, e
        if not all_ok(err is None):
            if err is not None:
                raise _named(s, err)
            raise RuntimeError(f"evaluation set {s.name!r} failed on another rank; see its error")
        return result

    def _encode(self, s: Any, model: DualEncoder, device: Any, labels: bool, captions: bool,
                split: str | None = None) -> EncodedImages:
        rank, world = world_info()
        batches = eval_batches(s.data, model.image_tower.data_config, self.batch_size, self.num_workers,
                               labels=labels, captions=captions, rank=rank, world=world,
                               fmt=getattr(s, "format", "auto"), caption_key=getattr(s, "caption_key", "txt"),
                               split=split or s.split)
        return encode_images(model, batches, device, labels=labels, captions=captions,
                             name=f"evaluation set {s.name!r} ({s.data})", allow_empty=world > 1)

    def _zeroshot(self, s: ZeroShotSet, model: DualEncoder, device: Any) -> dict[str, float] | None:
        enc = self._local(s, lambda: self._encode(s, model, device, labels=True, captions=False))
        emb, labels = gather_rows(enc.embeddings), gather_rows(enc.labels)
        if world_info()[0] != 0:
            return None
        names, templates, names_src, templates_src = s.sources
        classifier = build_classifier(model, model.text_tower.tokenizer_fn(), names, templates, device)
        metrics = zeroshot_metrics(emb, labels, classifier.float().cpu(), per_class=True)
        per_class = metrics.pop("per_class_recall")
        details = {"classnames": names, "per_class_recall": per_class, "classnames_source": names_src,
                   "templates": templates, "templates_source": templates_src}
        self.records.append({"dataset": s.name, "data": s.data, "task": "zeroshot_classification", "metrics": metrics,
                             "details": details})
        return metrics

    def _retrieval(self, s: RetrievalSet, model: DualEncoder, device: Any) -> dict[str, float] | None:
        def encode() -> tuple[EncodedImages, torch.Tensor, torch.Tensor]:
            enc = self._encode(s, model, device, labels=False, captions=True)
            texts, owner = flatten_captions(enc.captions or [])
            txt = encode_texts(model, model.text_tower.tokenizer_fn(), texts, device, self.batch_size)
            return enc, txt, owner

        enc, txt, owner = self._local(s, encode)
        owner = owner + row_offset(enc.embeddings.shape[0])
        img_all, txt_all, owner_all = gather_rows(enc.embeddings), gather_rows(txt), gather_rows(owner)
        if world_info()[0] != 0:
            return None
        metrics, details = retrieval_report(img_all, txt_all, owner_all, s.ks, s.ties, self.image_chunk,
                                            self.text_chunk, device, CURVE_KS)
        self.records.append({"dataset": s.name, "data": s.data, "task": "zeroshot_retrieval", "metrics": metrics,
                             "details": details})
        return metrics

    def _image_tower(self, s: LinearProbeSet | KnnSet, model: DualEncoder, device: Any) -> dict[str, float] | None:
        def encode() -> tuple[EncodedImages, EncodedImages]:
            return (self._encode(s, model, device, labels=True, captions=False, split=s.train_split),
                    self._encode(s, model, device, labels=True, captions=False))

        train, test = self._local(s, encode)
        parts = [(gather_rows(e.embeddings), gather_rows(e.labels), gather_strings(e.keys)) for e in (train, test)]
        if world_info()[0] != 0:
            return None
        metrics = s.score(*by_key(*parts[0]), *by_key(*parts[1]), device=device)
        per_class = metrics.pop("per_class_recall")
        self.records.append({"dataset": s.name, "data": s.data, "task": s.task, "metrics": metrics,
                             "details": {"per_class_recall": per_class, "train_split": s.train_split,
                                         "split": s.split}})
        return metrics
