"""Evaluation sets as data config (``data.eval_sets``), typed and checked when the config is loaded.

They live with the data, not inside ``trainer.callbacks``, so a config overrides them with
``data.eval_sets.zeroshot: [...]`` without restating the callback list. ``EvalCallback`` (during fit),
``dualenc validate`` and ``dualenc test`` all run them. Fields left ``None`` take the evaluation
suite's defaults (``dualenc.eval.suite.ZeroShotSet`` / ``RetrievalSet``, ``dualenc.eval.imagesets``'
``LinearProbeSet`` / ``KnnSet``); this module imports nothing
from ``dualenc.eval`` so the data module can be typed with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualenc.data.sources import expand_urls
from dualenc.errors import ConfigError

KNOWN_PROMPTS = ("imagenet",)  # names of built-in class-name / template lists, not files


@dataclass
class ZeroShotSpec:
    """A labelled image set: shards (``.cls`` labels, ``classnames.txt`` beside them) or an image folder."""

    name: str
    data: str
    classnames: str | list[str] | None = None
    templates: str | list[str] | None = None
    format: str | None = None


@dataclass
class RetrievalSpec:
    """Image + caption shards (several captions per image: one per line of the caption member)."""

    name: str
    data: str
    caption_key: str | None = None
    ks: list[int] | None = None
    ties: str | None = None


@dataclass
class LinearProbeSpec:
    """A CLIP_benchmark root (``root/{train,test}/*.tar``, ``.cls`` labels): a linear probe fitted on the
    train split's image embeddings (CLIP_benchmark's protocol, ``dualenc.eval.probe``), scored on test."""

    name: str
    data: str
    split: str | None = None
    train_split: str | None = None
    val_proportion: float | None = None
    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int | None = None


@dataclass
class KnnSpec:
    """A CLIP_benchmark root: kNN classification of the test split's image embeddings against the train
    split's (``dualenc.eval.knn``; ``weighting`` dino or uniform)."""

    name: str
    data: str
    split: str | None = None
    train_split: str | None = None
    ks: list[int] | None = None
    temperature: float | None = None
    weighting: str | None = None


@dataclass
class EvalSets:
    """The evaluation sets of a run, with the loader settings used to read them."""

    zeroshot: list[ZeroShotSpec] = field(default_factory=list)
    retrieval: list[RetrievalSpec] = field(default_factory=list)
    batch_size: int = 256
    num_workers: int = 2
    linear_probe: list[LinearProbeSpec] = field(default_factory=list)
    knn: list[KnnSpec] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.zeroshot or self.retrieval or self.linear_probe or self.knn)

    def set_kwargs(self) -> dict[str, list[dict[str, Any]]]:
        """The sets as keyword dicts for ``EvalSuite``, by kind (``None`` fields dropped: the suite's defaults)."""
        def kw(spec: Any) -> dict[str, Any]:
            d = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
            if "ks" in d:
                d["ks"] = tuple(d["ks"])
            return d

        return {kind: [kw(s) for s in getattr(self, kind)] for kind in KINDS}

    def check_paths(self) -> None:
        """Fail now, naming the set and the path, if a set's data or prompt file does not exist."""
        for kind, sets in ((k, getattr(self, k)) for k in KINDS):
            for i, s in enumerate(sets):
                where = f"data.eval_sets.{kind}[{i}] ({s.name!r})"
                if not Path(s.data).is_dir():
                    try:
                        expand_urls(s.data)
                    except FileNotFoundError as e:
                        raise ConfigError(f"{where}: data {s.data!r} not found (relative paths start at the working "
                                          f"directory {Path.cwd()}): {e}") from None
                for key in ("classnames", "templates"):
                    value = getattr(s, key, None)
                    if isinstance(value, str) and value not in KNOWN_PROMPTS and not Path(value).is_file():
                        raise ConfigError(f"{where}: {key} file {value!r} not found (relative paths start at the "
                                          f"working directory {Path.cwd()}); give a file or 'imagenet'")


KINDS: dict[str, type] = {"zeroshot": ZeroShotSpec, "retrieval": RetrievalSpec, "linear_probe": LinearProbeSpec,
                          "knn": KnnSpec}


def as_eval_sets(value: EvalSets | dict[str, Any] | None) -> EvalSets | None:
    """``value`` as ``EvalSets`` (dicts, e.g. from Python callers, are converted)."""
    if value is None or isinstance(value, EvalSets):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"data.eval_sets must be a mapping with {'/'.join(KINDS)} lists, got {value!r}")
    value = dict(value)
    sets = {kind: [s if isinstance(s, cls) else cls(**s) for s in value.pop(kind, None) or []]
            for kind, cls in KINDS.items()}
    return EvalSets(**sets, **value)
