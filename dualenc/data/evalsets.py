"""Evaluation sets as data config (``data.eval_sets``), typed and checked when the config is loaded.

They live with the data, not inside ``trainer.callbacks``, so a config overrides them with
``data.eval_sets.zeroshot: [...]`` without restating the callback list. ``EvalCallback`` (during fit),
``dualenc validate`` and ``dualenc test`` all run them. Fields left ``None`` take the evaluation
suite's defaults (``dualenc.eval.suite.ZeroShotSet`` / ``RetrievalSet``); this module imports nothing
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
class EvalSets:
    """The evaluation sets of a run, with the loader settings used to read them."""

    zeroshot: list[ZeroShotSpec] = field(default_factory=list)
    retrieval: list[RetrievalSpec] = field(default_factory=list)
    batch_size: int = 256
    num_workers: int = 2

    def __bool__(self) -> bool:
        return bool(self.zeroshot or self.retrieval)

    def set_kwargs(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The sets as keyword dicts for ``EvalSuite`` (``None`` fields dropped: the suite's defaults)."""
        def kw(spec: Any) -> dict[str, Any]:
            d = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
            if "ks" in d:
                d["ks"] = tuple(d["ks"])
            return d

        return [kw(s) for s in self.zeroshot], [kw(s) for s in self.retrieval]

    def check_paths(self) -> None:
        """Fail now, naming the set and the path, if a set's data or prompt file does not exist."""
        for kind, sets in (("zeroshot", self.zeroshot), ("retrieval", self.retrieval)):
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


def as_eval_sets(value: EvalSets | dict[str, Any] | None) -> EvalSets | None:
    """``value`` as ``EvalSets`` (dicts, e.g. from Python callers, are converted)."""
    if value is None or isinstance(value, EvalSets):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"data.eval_sets must be a mapping with zeroshot/retrieval lists, got {value!r}")
    value = dict(value)
    zs = [s if isinstance(s, ZeroShotSpec) else ZeroShotSpec(**s) for s in value.pop("zeroshot", None) or []]
    rt = [s if isinstance(s, RetrievalSpec) else RetrievalSpec(**s) for s in value.pop("retrieval", None) or []]
    return EvalSets(zs, rt, **value)
