"""PNG plots with matplotlib's Agg backend (no display needed); each function returns the file written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'dualenc[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def plot_per_class(names: Sequence[str], values: Sequence[float], path: str | Path, title: str = "per-class accuracy",
                   max_labels: int = 60) -> Path:
    """Per-class accuracy, sorted; with many classes only the worst and best few are labelled."""
    plt = _pyplot()
    order = np.argsort(np.asarray(values, dtype=float), kind="stable")
    vals = np.asarray(values, dtype=float)[order]
    n = len(vals)
    if n <= max_labels:
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.22 * n + 1)))
        ax.barh(range(n), vals, color="tab:blue")
        ax.set_yticks(range(n), [names[i] for i in order], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("accuracy (recall)")
        ax.axvline(float(vals.mean()), color="tab:red", ls="--", lw=1)
    else:
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.bar(range(n), vals, width=1.0, color="tab:blue")
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"{n} classes, sorted")
        ax.set_ylabel("accuracy (recall)")
        worst = ", ".join(names[i] for i in order[:5])
        ax.text(0.01, 0.97, f"worst: {worst}", transform=ax.transAxes, va="top", fontsize=7)
        ax.axhline(float(vals.mean()), color="tab:red", ls="--", lw=1)
    ax.set_title(f"{title} (mean {vals.mean():.3f})")
    return _save(fig, path)


def plot_recall_curves(curves: dict[str, dict[Any, float]], path: str | Path, title: str = "Recall@K") -> Path:
    """One line per direction: Recall@K against K (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[k] if k in curve else curve[str(k)] for k in ks], marker="o", label=label.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_similarity_heatmap(sim: Any, path: str | Path, row_labels: Sequence[str] | None = None,
                            col_labels: Sequence[str] | None = None, title: str = "image-text similarity") -> Path:
    """A (rows x cols) cosine-similarity heatmap; matching pairs sit on the diagonal."""
    plt = _pyplot()
    s = np.asarray(sim.detach().cpu() if hasattr(sim, "detach") else sim, dtype=float)
    fig, ax = plt.subplots(figsize=(0.35 * s.shape[1] + 3, 0.3 * s.shape[0] + 2))
    im = ax.imshow(s, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.04)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), [str(x)[:30] for x in row_labels], fontsize=6)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), [str(x)[:30] for x in col_labels], fontsize=6, rotation=90)
    ax.set_xlabel("texts")
    ax.set_ylabel("images")
    ax.set_title(title)
    return _save(fig, path)


def plot_temperature(steps: Sequence[int], values: Sequence[float], path: str | Path,
                     title: str = "temperature over training") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(steps), list(values), color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("temperature (1 / logit scale)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)
