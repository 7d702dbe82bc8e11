"""Progress bars for the commands (tqdm on stderr), with totals and ETA where the total is known.

On only when stderr is a terminal, so logs and pipes get no bar noise; ``DUALENC_PROGRESS=1`` forces
bars on (e.g. under a job scheduler that captures a pseudo-terminal badly), ``DUALENC_PROGRESS=0``
off. Sample totals come from the shards' ``sizes.json`` / img2dataset ``*_stats.json`` counts; without
them the bar shows counts and rate only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "DUALENC_PROGRESS"


def enabled() -> bool:
    """Whether bars are shown: ``DUALENC_PROGRESS`` if set, else whether stderr is a terminal."""
    env = os.environ.get(ENV)
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", disable: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one to ``update``).

    ``disable``: True turns it off (e.g. a library call inside training); None: as :func:`enabled` says.
    """
    from tqdm import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=(not enabled()) if disable is None else disable,
                dynamic_ncols=True, mininterval=0.5, leave=True, **kwargs)


def sample_total(shards: Any) -> int | None:
    """Samples in ``shards`` (a spec or a list of paths) by their counts files; ``None`` when unknown."""
    from dualenc.data.sources import count_samples, expand_urls

    try:
        urls = [str(u) for u in shards] if isinstance(shards, (list, tuple)) else expand_urls(str(shards))
        return count_samples(urls)
    except Exception:  # noqa: BLE001 - a missing total only costs the ETA
        return None
