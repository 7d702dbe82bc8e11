"""Scalars from TensorBoard event files (``TensorBoardLogger`` output), for ``dualenc report``.

Read with TensorBoard's own ``EventAccumulator`` (the ``tensorboard`` extra), not a parser of ours.
"""

from __future__ import annotations

from pathlib import Path

from dualenc.errors import ConfigError


def event_files(path: str | Path) -> list[Path]:
    """``path`` if it is an event file, else every ``events.out.tfevents.*`` under it."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; TensorBoardLogger writes "
                                "<save_dir>/<name>/version_N/events.out.tfevents.*")
    files = sorted(path.rglob("events.out.tfevents.*"))
    if not files:
        raise ConfigError(f"no TensorBoard event file (events.out.tfevents.*) under {path}; check --tensorboard")
    return files


def read_tensorboard_metric(path: str | Path, tag: str = "train/temperature") -> tuple[list[int], list[float]]:
    """(steps, values) of scalar ``tag`` over the event files at ``path``, in step order."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError as e:
        raise ConfigError("reading TensorBoard event files needs the tensorboard package: "
                          "pip install 'dualenc[tensorboard]'") from e
    points: dict[int, float] = {}
    tags: set[str] = set()
    for f in event_files(path):
        acc = EventAccumulator(str(f), size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        have = acc.Tags().get("scalars", [])
        tags.update(have)
        if tag in have:
            points.update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    if not points:
        raise ConfigError(f"{path}: no scalar {tag!r} in the event files; scalars there: {sorted(tags)}")
    steps = sorted(points)
    return steps, [points[s] for s in steps]
