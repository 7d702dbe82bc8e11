"""Alignment with real text encoders: all-MiniLM-L6-v2 <-> all-mpnet-base-v2 on WordNet glosses.

    python bench/real_text_data.py --cache C --wordnet W --encoder minilm=MINILM --encoder mpnet=MPNET \
        --rows mpnet=12288                      # embed once (cached; MPNet is slow on 2 CPU cores)
    python bench/study_real_text.py --cache C --out bench/results/real_text.json

Rows (held-out items scored among 8,192 shuffled candidates, vec2vec's metrics):
* controls on MiniLM alone: its embeddings rotated by a random orthogonal matrix (``planted``), and
  rotated after a small nonlinearity (``planted_nonlinear``), learned from disjoint halves (no pairs);
* the real pair: paired Procrustes / least squares / ridge / MLP at 10-3,000 anchors; unpaired
  MNN-Procrustes, Sinkhorn-Procrustes, vec2vec (plain and started from MNN-Procrustes), each also after
  whitening both sides; identity / constant-mean / random-Q baselines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from dualenc.plugins.baselines import fit_linear, fit_mlp, fit_sinkhorn_procrustes
from dualenc.plugins.checks import FewAnchorsWarning
from dualenc.plugins.commands import baseline_rows
from dualenc.plugins.crossmodel import translation_metrics
from dualenc.plugins.procrustes import fit_procrustes
from dualenc.plugins.study import write_json_atomic
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.translate import train_vec2vec
from dualenc.plugins.unpaired import fit_mnn_procrustes
from dualenc.plugins.whitening import fit_whitening

Fn = Callable[[torch.Tensor], torch.Tensor]
EVAL = 8192


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def planted_target(x: torch.Tensor, nonlinear: float = 0.0, seed: int = 0) -> torch.Tensor:
    """MiniLM rotated by a random orthogonal matrix, after ``x + nonlinear * tanh(3 W x)`` if asked."""
    g = torch.Generator().manual_seed(seed)
    r = random_orthogonal(x.shape[1], x.shape[1], g, torch.float32)
    w = torch.randn(x.shape[1], x.shape[1], generator=g) / x.shape[1] ** 0.5
    y = x + nonlinear * torch.tanh(3 * x @ w.T) if nonlinear else x
    return F.normalize(F.normalize(y, dim=-1) @ r.T, dim=-1)


def score(fn: Fn, a_eval: torch.Tensor, b_eval: torch.Tensor) -> dict[str, float]:
    return translation_metrics(fn(a_eval).float(), b_eval.float())


def whitened(fit: Callable[[torch.Tensor, torch.Tensor], Fn], a: torch.Tensor, b: torch.Tensor) -> Fn:
    """Whiten each side on its own training set, match there, map back with b's inverse whitening."""
    wa, wb = fit_whitening(a), fit_whitening(b)
    inner = fit(wa.apply(a.double()).float(), wb.apply(b.double()).float())
    back = torch.linalg.pinv(wb.w)
    return lambda x: (inner(wa.apply(x.double()).float()).double() @ back + wb.mean).float()


def unpaired_fitters(v2v: dict[str, Any]) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Fn]]:
    fitted: dict[int, Any] = {}  # the MNN-Procrustes map of a training pair, reused as vec2vec's start

    def mnn_map(a, b):
        key = id(a) ^ id(b)
        if key not in fitted:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewAnchorsWarning)
                fitted[key] = fit_mnn_procrustes(a.double(), b.double())
        return fitted[key]

    def mnn(a, b):
        m = mnn_map(a, b)
        return lambda x: m.apply(x.double()).float()

    def sinkhorn(a, b):
        m = fit_sinkhorn_procrustes(a.double(), b.double())
        return lambda x: m.apply(x.double()).float()

    def vec2vec(init):
        def fit(a, b):
            t0 = time.time()
            start = mnn_map(a, b) if init == "mnn" else None
            m, hist = train_vec2vec(a, b, init=start, log_every=max(1, v2v["steps"] // 4), **v2v)
            log(f"    vec2vec init={init}: {time.time() - t0:.0f}s, last losses "
                f"{ {k: round(v, 4) for k, v in hist[-1].items()} }")
            return lambda x: m.apply(x.float())
        return fit

    return {"sinkhorn_procrustes": sinkhorn, "vec2vec": vec2vec(None), "mnn_procrustes": mnn,
            "vec2vec_init_mnn": vec2vec("mnn")}


def unpaired_block(a_train, b_train, a_eval, b_eval, fitters, whiten: bool, paired: tuple | None = None):
    rows: dict[str, Any] = {k: v for k, v in baseline_rows({"x": a_eval.double()}, {"x": b_eval.double()})["x"].items()}
    if paired is not None:
        oracle = fit_procrustes(paired[0].double(), paired[1].double(), on_few_anchors="warn")
        rows["paired_procrustes_upper_bound"] = score(lambda x: oracle.apply(x.double()), a_eval, b_eval)
    for name, fit in fitters.items():
        for w in ((False, True) if whiten and not name.startswith("vec2vec") else (False,)):
            t0 = time.time()
            try:
                fn = whitened(fit, a_train, b_train) if w else fit(a_train, b_train)
                r = {**score(fn, a_eval, b_eval), "seconds": time.time() - t0}
            except Exception as e:  # a failed fit is a row, not a crash of the whole study
                r = {"error": f"{type(e).__name__}: {e}"}
            key = f"{name}+whitening" if w else name
            rows[key] = r
            log(f"  {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)))
    return rows


def paired_sweep(a_pool, b_pool, a_eval, b_eval, sizes, mlp_steps: int) -> dict[str, Any]:
    fits = {
        "procrustes": lambda x, y: fit_procrustes(x, y, on_few_anchors="warn"),
        "least_squares": lambda x, y: fit_linear(x, y),
        "ridge": lambda x, y: fit_linear(x, y, ridge=1e-2),
        "mlp": lambda x, y: fit_mlp(x, y, steps=mlp_steps, hidden=512),
    }
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        idx = torch.randperm(len(a_pool), generator=g)[:n]
        for name, fit in fits.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewAnchorsWarning)
                m = fit(a_pool[idx].double(), b_pool[idx].double())
            out.setdefault(name, {})[str(n)] = score(lambda x: m.apply(x.double()), a_eval, b_eval)
        log(f"  paired {n}: " + ", ".join(f"{k} top1 {v[str(n)]['top1']:.3f}" for k, v in out.items()))
    return out


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Top-1 among 8,192 vs paired anchors for the real pair, with the unpaired methods as flat lines."""
    real = result.get("real")
    if not real or "paired" not in real:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("top1", "mean_cosine")):
        for name, by_n in real["paired"].items():
            ns = sorted(by_n, key=int)
            ax.plot([int(n) for n in ns], [by_n[n][metric] for n in ns], marker="o", label=f"paired {name}")
        for name, r in real.get("unpaired", {}).items():
            if metric in r and name in ("mnn_procrustes", "sinkhorn_procrustes", "vec2vec", "vec2vec_init_mnn",
                                        "constant_mean"):
                ax.axhline(r[metric], ls="--", lw=1, label=f"{name} (0 pairs)", color=None)
        ax.set_xscale("log")
        ax.set_xlabel("paired anchors")
        ax.set_ylabel(f"{metric} (8,192 held-out)")
        ax.set_title(f"MiniLM -> MPNet, WordNet glosses: {metric}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="the directory bench/real_text_data.py wrote")
    p.add_argument("--out", default="bench/results/real_text.json")
    p.add_argument("--plot", default="docs/alignment_real_text.png")
    p.add_argument("--planted-per-side", type=int, default=12288)
    p.add_argument("--nonlinear", type=float, default=0.3)
    p.add_argument("--anchors", default="10,30,100,300,1000,3000")
    p.add_argument("--steps", type=int, default=300, help="vec2vec steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--mlp-steps", type=int, default=300)
    p.add_argument("--parts", default="planted,planted_nonlinear,real")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--unpaired", default="mnn_procrustes,sinkhorn_procrustes,vec2vec,vec2vec_init_mnn",
                   help="unpaired methods to run (MNN-Procrustes is the slow one on loaded cores)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    mini = torch.from_numpy(np.load(cache / "minilm.npy"))
    v2v = {"steps": a.steps, "batch_size": a.batch_size, "hidden_dim": a.hidden}
    fitters = {k: v for k, v in unpaired_fitters(v2v).items() if k in a.unpaired.split(",")}
    parts = a.parts.split(",")
    result: dict[str, Any] = {"config": vars(a), "loadavg_start": os.getloadavg(), "torch_threads": a.threads}
    n = a.planted_per_side
    a_eval = mini[-EVAL:]
    for part, nl in (("planted", 0.0), ("planted_nonlinear", a.nonlinear)):
        if part not in parts:
            continue
        log(f"{part}: MiniLM -> MiniLM rotated (nonlinearity {nl}), {n} vectors a side, disjoint, no pairs")
        b_eval = planted_target(a_eval, nl)
        result[part] = unpaired_block(mini[:n], planted_target(mini[n:2 * n], nl), a_eval, b_eval, fitters,
                                      whiten=False, paired=(mini[:n], planted_target(mini[:n], nl)))
        write_json_atomic(a.out, result)
    if "real" in parts and (cache / "mpnet.npy").is_file():
        mp = torch.from_numpy(np.load(cache / "mpnet.npy"))
        rows = len(mp)
        train = rows - EVAL
        log(f"real: MiniLM (384) -> MPNet (768); {EVAL} held-out, {train} training items")
        a_ev, b_ev = mini[train:rows], mp[train:]
        real: dict[str, Any] = {"rows": rows, "train_items": train}
        sizes = [s for s in (int(x) for x in a.anchors.split(",")) if s <= train]
        real["paired"] = paired_sweep(mini[:train], mp[:train], a_ev, b_ev, sizes, a.mlp_steps)
        result["real"] = real
        write_json_atomic(a.out, result)  # the paired half is kept if the slow unpaired half is cut short
        # Unpaired: MiniLM side from items MPNet never embedded (more of them), MPNet side its training items.
        real["unpaired"] = unpaired_block(mini[rows:rows + 2 * train], mp[:train], a_ev, b_ev, fitters, whiten=True,
                                          paired=(mini[:train], mp[:train]))
        result["real"] = real
    result["loadavg_end"] = os.getloadavg()
    write_json_atomic(a.out, result)
    if a.plot and plot(result, a.plot):
        log(f"wrote {a.plot}")
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
