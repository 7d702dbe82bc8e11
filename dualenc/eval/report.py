"""Result records (close to CLIP_benchmark's JSON schema), the training-log reader, and plots from records."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from dualenc.eval.store import write_json_atomic

__all__ = ["result_record", "write_results", "read_results", "read_csv_metric", "plot_record", "summary_table",
           "write_json_atomic"]


def result_record(dataset: str, model: str, task: str, metrics: dict[str, Any], details: dict[str, Any] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """``{dataset, model, pretrained, task, metrics, language}`` as CLIP_benchmark writes, plus optional
    ``details`` (per-class recall, recall curves) for plots, and any ``extra`` keys."""
    record = {"dataset": dataset, "model": model, "pretrained": model, "task": task, "metrics": metrics,
              "language": "en", **extra}
    if details:
        record["details"] = details
    return record


def write_results(path: str | Path, records: dict[str, Any] | list[dict[str, Any]]) -> Path:
    """One record (a dict) or several (a list), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, records)
    return path


def read_results(path: str | Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    records = data if isinstance(data, list) else [data]
    for r in records:
        if not isinstance(r, dict) or "task" not in r or "metrics" not in r:
            raise ValueError(f"{path} is not a results file: each record needs 'task' and 'metrics'")
    return records


def read_csv_metric(path: str | Path, column: str = "train/temperature") -> tuple[list[int], list[float]]:
    """(steps, values) of one column of Lightning's CSVLogger ``metrics.csv`` (rows without it skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; CSVLogger writes <save_dir>/<name>/version_N/metrics.csv")
    steps, values = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no column {column!r}; columns: {reader.fieldnames}")
        for row in reader:
            if row.get(column) not in (None, ""):
                steps.append(int(float(row.get("step") or len(steps))))
                values.append(float(row[column]))
    if not values:
        raise ValueError(f"{path}: column {column!r} is empty (was the metric logged?)")
    return steps, values


def plot_record(record: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The plots a record's details allow: per-class accuracy bars, Recall@K curves."""
    from dualenc.eval import plots

    out, name, made = Path(out_dir), _slug(str(record.get("dataset", "data"))), []
    details = record.get("details") or {}
    if "per_class_recall" in details:
        names = details.get("classnames") or [str(i) for i in range(len(details["per_class_recall"]))]
        made.append(plots.plot_per_class(names, details["per_class_recall"], out / f"{name}_per_class.png",
                                         title=f"{record.get('dataset')}: per-class accuracy"))
    if "recall_curves" in details:
        made.append(plots.plot_recall_curves(details["recall_curves"], out / f"{name}_recall_at_k.png",
                                             title=f"{record.get('dataset')}: Recall@K"))
    return made


def summary_table(records: list[dict[str, Any]]) -> str:
    """A plain-text table: one line per record with its scalar metrics."""
    lines = []
    for r in records:
        scalars = ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
        lines.append(f"{r.get('dataset', '?')} [{r['task']}] {r.get('model', '')}: {scalars}")
    return "\n".join(lines)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s) or "data"
