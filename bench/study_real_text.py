"""Alignment with real text encoders: all-MiniLM-L6-v2 (384-d) -> all-mpnet-base-v2 (768-d) on WordNet glosses.

    python bench/real_text_data.py --cache C --wordnet W --encoder minilm=MINILM --encoder mpnet=MPNET
    python bench/study_real_text.py --cache C                       # every part; ~1-2 h on 2 loaded cores
    python bench/study_real_text.py --cache C --parts unpaired,steps --unpaired vec2vec,vec2vec_init  # only vec2vec

Splits of the 32,768 cached glosses (both models embedded all of them, rows in corpus order):
* held-out: the last 8,192 items; every row is scored among these 8,192 shuffled candidates (vec2vec's
  metrics: mean cosine to the true MPNet embedding, top-1, mean rank);
* unpaired training: MiniLM embeds items 0..12,287 only, MPNet items 12,288..24,575 only: disjoint,
  so no pair exists. Whitening (``+whitening`` rows) is fitted on these same per-model sets;
* paired anchors: nested seeded draws from the 24,576 training items; the upper bound is Procrustes on
  all 24,576 pairs.

Parts (``--parts``): ``paired`` (Procrustes, +whitening, least squares, ridge, MLP vs anchors),
``unpaired`` (0 pairs: baselines, MNN-Procrustes plain/robust, Sinkhorn-Procrustes, vec2vec plain and
from robust MNN, each raw and whitened), ``curve`` (top-1 vs unpaired vectors a side), ``steps``
(vec2vec top-1 vs steps), ``diagnose`` (does unpaired MNN refinement keep a correct paired start?),
``planted`` (control: MiniLM vs its own planted rotation). Results are merged into ``--out`` by key,
so re-running a part or a subset of methods replaces only those rows.
"""

from __future__ import annotations

import argparse
import json
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
from dualenc.plugins.maps import load_map
from dualenc.plugins.procrustes import fit_procrustes
from dualenc.plugins.study import write_json_atomic
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.translate import train_vec2vec
from dualenc.plugins.unpaired import fit_mnn_procrustes
from dualenc.plugins.whitening import fit_whitening

Fn = Callable[[torch.Tensor], torch.Tensor]
Fit = Callable[[torch.Tensor, torch.Tensor], Fn]
EVAL = 8192
UNPAIRED = 12288  # vectors a side for unpaired training (disjoint item sets)
PAPER = {"pair": "gte -> e5 on Natural Questions (vec2vec, Jha et al. 2025, unpaired)", "mean_cosine": 0.87,
         "top1": 0.99, "mean_rank": 5.19}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def planted_target(x: torch.Tensor, nonlinear: float = 0.0, seed: int = 0) -> torch.Tensor:
    """MiniLM rotated by a random orthogonal matrix, after ``x + nonlinear * tanh(3 W x)`` if asked."""
    g = torch.Generator().manual_seed(seed)
    r = random_orthogonal(x.shape[1], x.shape[1], g, torch.float32)
    w = torch.randn(x.shape[1], x.shape[1], generator=g) / x.shape[1] ** 0.5
    y = x + nonlinear * torch.tanh(3 * x @ w.T) if nonlinear else x
    return F.normalize(F.normalize(y, dim=-1) @ r.T, dim=-1)


def scored(fn: Fn, a_eval: torch.Tensor, b_eval: torch.Tensor, t0: float | None = None, **extra: Any) -> dict[str, Any]:
    with torch.no_grad():
        r: dict[str, Any] = translation_metrics(fn(a_eval).float(), b_eval.float())
    if t0 is not None:
        r["seconds"] = round(time.time() - t0, 1)
        r["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return {**r, **extra}


def quiet(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewAnchorsWarning)
        return fn(*args, **kw)


def rank(x: torch.Tensor, rel: float = 1e-8) -> int:
    """Directions the centred embeddings really span (MiniLM's span 381 of 384: whitening keeps only those)."""
    s = torch.linalg.svdvals(x.double() - x.double().mean(0))
    return int((s ** 2 > rel * s[0] ** 2).sum())


class Whiten:
    """Each model whitened on its own unpaired training set (no pairs used); maps fitted in between."""

    def __init__(self, a_ref: torch.Tensor, b_ref: torch.Tensor) -> None:
        self.wa, self.wb = fit_whitening(a_ref, rank(a_ref)), fit_whitening(b_ref, rank(b_ref))
        self.back = torch.linalg.pinv(self.wb.w)
        self.b_norm = float(self.wb.apply(b_ref.double()).norm(dim=1).mean())

    def a(self, x: torch.Tensor) -> torch.Tensor:
        return self.wa.apply(x.double())

    def b(self, y: torch.Tensor) -> torch.Tensor:
        return self.wb.apply(y.double())

    def wrap(self, inner: Fn, unit_output: bool = False) -> Fn:
        """``inner`` maps whitened a -> whitened b; unit-norm outputs (vec2vec) get b's typical whitened norm."""
        def fn(x: torch.Tensor) -> torch.Tensor:
            y = inner(self.a(x)).double()
            if unit_output:
                y = F.normalize(y, dim=-1) * self.b_norm
            return (y @ self.back + self.wb.mean).float()
        return fn


def orth_fn(m: Any) -> Fn:
    return lambda x: m.apply(x.double())


# -- paired --------------------------------------------------------------------------------------------

def paired_part(S: dict[str, Any], sizes: list[int], draws: int, mlp_steps: int) -> dict[str, Any]:
    ap, bp, ae, be, wh = S["a_pool"], S["b_pool"], S["a_eval"], S["b_eval"], S["whiten"]
    fits: dict[str, Callable[[torch.Tensor, torch.Tensor], Fn]] = {
        "procrustes": lambda x, y: orth_fn(quiet(fit_procrustes, x, y, on_few_anchors="warn")),
        "procrustes+whitening": lambda x, y: wh.wrap(orth_fn(quiet(fit_procrustes, wh.a(x), wh.b(y),
                                                                   on_few_anchors="warn"))),
        "least_squares": lambda x, y: orth_fn(quiet(fit_linear, x, y)),
        "ridge": lambda x, y: orth_fn(quiet(fit_linear, x, y, ridge=1e-2)),  # fixed before the run, not tuned
        "mlp": lambda x, y: orth_fn(fit_mlp(x, y, steps=mlp_steps, hidden=512)),
    }
    out: dict[str, Any] = {}
    for d in range(draws):
        perm = torch.randperm(len(ap), generator=torch.Generator().manual_seed(d))
        for n in sizes:
            idx = perm[:n]  # nested draws: a larger anchor set contains the smaller ones
            for name, fit in fits.items():
                t0 = time.time()
                r = scored(fit(ap[idx].double(), bp[idx].double()), ae, be, t0)
                out.setdefault(name, {}).setdefault(str(n), {"draws": []})["draws"].append(r)
            log(f"  paired draw {d} n={n}: " + ", ".join(
                f"{k} {v[str(n)]['draws'][-1]['top1']:.3f}" for k, v in out.items()))
    for by_n in out.values():
        for cell in by_n.values():
            for k in ("mean_cosine", "top1", "mean_rank"):
                v = torch.tensor([r[k] for r in cell["draws"]])
                cell[k], cell[f"{k}_std"] = float(v.mean()), float(v.std()) if len(v) > 1 else 0.0
    t0 = time.time()
    ub = {"procrustes_all_pairs": scored(orth_fn(fit_procrustes(ap.double(), bp.double())), ae, be, t0,
                                         anchors=len(ap))}
    t0 = time.time()
    ub["least_squares_all_pairs"] = scored(orth_fn(fit_linear(ap.double(), bp.double())), ae, be, t0, anchors=len(ap))
    t0 = time.time()
    ub["procrustes+whitening_all_pairs"] = scored(wh.wrap(orth_fn(fit_procrustes(wh.a(ap), wh.b(bp)))), ae, be, t0,
                                                  anchors=len(ap))
    log("  upper bounds: " + ", ".join(f"{k} cos {v['mean_cosine']:.3f} top1 {v['top1']:.3f}" for k, v in ub.items()))
    return {"by_anchors": out, "upper_bound": ub, "draws": draws, "mlp_steps": mlp_steps}


# -- unpaired ------------------------------------------------------------------------------------------

def unpaired_fitters(v2v: dict[str, Any], map_dir: Path | None = None) -> dict[str, Any]:
    """Each fitter: (a_train, b_train, key) -> (map, extra info). The robust MNN map of a split (``key``:
    its size and whitening) is kept in memory and in ``map_dir``, so ``vec2vec_init`` starts from the very
    same map and a later vec2vec-only run need not refit it."""
    robust_maps: dict[str, tuple[Any, float | None]] = {}

    def robust_map(a, b, key, from_disk: bool):
        f = map_dir / f"mnn_robust_{key}.map" if map_dir else None
        if key not in robust_maps and from_disk and f is not None and f.is_file():
            cached = load_map(f)
            if cached.meta.extra.get("start") == "similarity":  # maps from the old PCA start are stale: refit
                robust_maps[key] = (cached, None)
        if key not in robust_maps:
            t0 = time.time()
            m = quiet(fit_mnn_procrustes, a.double(), b.double(), robust=True)
            robust_maps[key] = (m, round(time.time() - t0, 1))
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                m.save(f)
        return robust_maps[key]

    def mnn(robust: bool):
        def fit(a, b, key):
            if robust:  # a map fitted by an earlier run is reused (its fit time is in that run's log)
                m, sec = robust_map(a, b, key, from_disk=True)
                info = {"fit_seconds": sec}
            else:
                m, info = quiet(fit_mnn_procrustes, a.double(), b.double()), {}
            return orth_fn(m), {**info, **{k: m.meta.extra[k] for k in ("iterations", "mnn_pairs")}}
        return fit

    def sinkhorn(a, b, key):
        m = fit_sinkhorn_procrustes(a.double(), b.double())
        return orth_fn(m), {"chosen_init": m.meta.extra["chosen_init"]}

    def vec2vec(init: bool, steps: int | None = None):
        def fit(a, b, key):
            start = robust_map(a, b, key, from_disk=True)[0] if init else None
            n = steps or v2v["steps"]
            t0 = time.time()
            m, hist = train_vec2vec(a.float(), b.float(), init=start, log_every=max(1, n // 4),
                                    **{**v2v, "steps": n})
            log(f"    vec2vec init={'robust_mnn' if init else 'none'} {n} steps: {time.time() - t0:.0f}s, last "
                f"losses { {k: round(v, 4) for k, v in hist[-1].items()} }")
            return (lambda x: m.apply(x.float())), {"steps": n, "train_seconds": round(time.time() - t0, 1),
                                                     "losses": hist, "unit_output": True}
        return fit

    return {"mnn_procrustes": mnn(False), "mnn_procrustes_robust": mnn(True), "sinkhorn_procrustes": sinkhorn,
            "vec2vec": vec2vec(False), "vec2vec_init": vec2vec(True), "_vec2vec_steps": vec2vec}


def run_unpaired(fit, a_tr, b_tr, S, whiten: bool, key: str) -> dict[str, Any]:
    t0 = time.time()
    try:
        if whiten:
            wh = Whiten(a_tr, b_tr)
            inner, info = fit(wh.a(a_tr), wh.b(b_tr), key + "+w")
            fn = wh.wrap(inner, unit_output=bool(info.get("unit_output")))
        else:
            fn, info = fit(a_tr, b_tr, key)
        return scored(fn, S["a_eval"], S["b_eval"], t0, vectors_a_side=len(a_tr),
                      **{k: v for k, v in info.items() if k != "unit_output"})
    except Exception as e:  # a failed fit is a row, not a crash of the whole study
        return {"error": f"{type(e).__name__}: {e}", "seconds": round(time.time() - t0, 1)}


def show(name: str, r: dict[str, Any]) -> None:
    log(f"  {name}: " + ", ".join(f"{k} {r[k]:.3f}" for k in ("mean_cosine", "top1", "mean_rank", "seconds") if k in r)
        + (f" ERROR {r['error']}" if "error" in r else ""))


def unpaired_part(S, fitters, methods: list[str], variants: list[str]) -> dict[str, Any]:
    rows: dict[str, Any] = dict(baseline_rows({"x": S["a_eval"].double()}, {"x": S["b_eval"].double()})["x"])
    for name in methods:
        for v in variants:
            key = name + ("+whitening" if v == "whiten" else "")
            rows[key] = run_unpaired(fitters[name], S["a_un"], S["b_un"], S, v == "whiten", f"{len(S['a_un'])}")
            show(key, rows[key])
    return rows


def curve_part(S, fitters, methods: list[str], sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in methods:
        name, whiten = key.split("+")[0], key.endswith("+whitening")
        for n in sizes:
            r = run_unpaired(fitters[name], S["a_un"][:n], S["b_un"][:n], S, whiten, f"{n}")
            out.setdefault(key, {})[str(n)] = r
            show(f"{key} @ {n} a side", r)
    return out


def steps_part(S, fitters, steps: list[int], init: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in steps:
        r = run_unpaired(fitters["_vec2vec_steps"](init, n), S["a_un"], S["b_un"], S, False, f"{len(S['a_un'])}")
        out[str(n)] = r
        show(f"vec2vec{'_init' if init else ''} {n} steps", r)
    return {("vec2vec_init" if init else "vec2vec"): out}


def diagnose_part(S, anchors: list[int], robust_anchors: list[int]) -> dict[str, Any]:
    """Start unpaired MNN refinement from a paired Procrustes map (fitted on n anchors): if even a correct
    start drifts away, the unpaired objective itself (not the search) is what fails on this pair."""
    out: dict[str, Any] = {}
    ap, bp, a_un, b_un = S["a_pool"], S["b_pool"], S["a_un"], S["b_un"]
    perm = torch.randperm(len(ap), generator=torch.Generator().manual_seed(0))
    for n in anchors:
        idx = perm[:n]
        m0 = quiet(fit_procrustes, ap[idx].double(), bp[idx].double(), on_few_anchors="warn")
        start = orth_fn(m0)
        out[f"paired_{n}"] = scored(start, S["a_eval"], S["b_eval"])
        for robust in (False, True) if n in robust_anchors else (False,):
            t0 = time.time()
            m = quiet(fit_mnn_procrustes, start(a_un).double(), b_un.double(), init="identity", robust=robust)
            key = f"paired_{n}_then_mnn" + ("_robust" if robust else "")
            out[key] = scored(lambda x: m.apply(start(x)), S["a_eval"], S["b_eval"], t0,
                              iterations=m.meta.extra["iterations"], mnn_pairs=m.meta.extra["mnn_pairs"])
            show(key, out[key])
    return out


def planted_part(mini: torch.Tensor, fitters, methods: list[str], n: int) -> dict[str, Any]:
    a_eval = mini[-EVAL:]
    S = {"a_eval": a_eval, "b_eval": planted_target(a_eval)}
    rows: dict[str, Any] = {"identity": scored(lambda x: x, a_eval, S["b_eval"])}
    for name in methods:
        rows[name] = run_unpaired(fitters[name], mini[:n], planted_target(mini[n:2 * n]), S,
                                  False, "planted")
        show(f"planted {name}", rows[name])
    return rows


# -- plot ----------------------------------------------------------------------------------------------

def plot(res: dict[str, Any], path: str | Path) -> Path | None:
    """Top-1 among 8,192 vs paired anchors, vs unpaired vectors a side, and vs vec2vec steps."""
    if "paired" not in res:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance = 1 / EVAL
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    ax = axes[0]
    for name, by_n in res["paired"]["by_anchors"].items():
        ns = sorted(by_n, key=int)
        ax.errorbar([int(n) for n in ns], [by_n[n]["top1"] for n in ns], [by_n[n]["top1_std"] for n in ns],
                    marker="o", ms=4, capsize=2, label=name)
    semi = sorted((int(k.split("_")[1]), v) for k, v in res.get("diagnose", {}).items()
                  if k.endswith("_then_mnn") and int(k.split("_")[1]) <= 3000)
    if semi:
        ax.plot([n for n, _ in semi], [v["top1"] for _, v in semi], "k*", ms=10, ls="none",
                label="Q on n anchors + unpaired MNN")
    ub = res["paired"]["upper_bound"]["procrustes_all_pairs"]
    ax.axhline(ub["top1"], color="k", ls=":", lw=1, label=f"Q, all {ub['anchors']:,} pairs")
    ax.set_xscale("log")
    ax.set_xlabel("paired anchors")
    ax.set_ylabel("top-1 among 8,192 held-out")
    ax.set_title("paired: MiniLM -> MPNet")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(0.0, 0.62))
    ax = axes[1]
    previous = res.get("pca_start_previous", {}).get("curve", {})
    for (name, by_n), old in [(kv, False) for kv in res.get("curve", {}).items()] + [(kv, True) for kv in previous.items()]:
        ns = sorted((n for n in by_n if "top1" in by_n[n]), key=int)
        ax.plot([int(n) for n in ns], [by_n[n]["top1"] for n in ns], marker="s", ls="--" if old else "-",
                label=f"unpaired {name}" + (", PCA start (previous)" if old else ", similarity start"))
    ax.axhline(0.5, color="g", ls="--", lw=1, label="issue goal (0.5)")
    ax.axhline(chance, color="r", ls=":", lw=1, label="chance (1/8,192)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("unpaired training vectors a side (disjoint items, 0 pairs)")
    ax.set_title("unpaired: vectors a side")
    ax.legend(fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.3))
    ax = axes[2]
    for name, by_n in res.get("steps", {}).items():
        ns = sorted((n for n in by_n if "top1" in by_n[n]), key=int)
        ax.plot([int(n) for n in ns], [by_n[n]["top1"] for n in ns], marker="^", label=name)
    ax.axhline(0.5, color="g", ls="--", lw=1)
    ax.axhline(chance, color="r", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"vec2vec training steps ({res.get('unpaired_config', {}).get('vectors_a_side', UNPAIRED):,} vectors a side)")
    ax.set_title("unpaired: vec2vec steps")
    ax.legend(fontsize=7, loc="center right")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# -- markdown tables for docs/alignment.md --------------------------------------------------------------

def cell(r: dict[str, Any] | None, std: bool = False) -> str:
    """mean cos / top-1 (± std over anchor draws) / mean rank."""
    if not r or "top1" not in r:
        return "not run" if not r else "error"
    rank = f"{r['mean_rank']:.1f}" if r["mean_rank"] < 100 else f"{r['mean_rank']:,.0f}"
    top1 = f"{r['top1']:.3f}" + (f" ± {r['top1_std']:.3f}" if std and "top1_std" in r else "")
    return f"{r['mean_cosine']:.3f} / {top1} / {rank}"


def tables(res: dict[str, Any]) -> str:
    out = []
    if "paired" in res:
        by = res["paired"]["by_anchors"]
        ns = sorted(next(iter(by.values())), key=int)
        out += ["| anchors | " + " | ".join(by) + " |", "|---" * (len(by) + 1) + "|"]
        out += [f"| {int(n):,} | " + " | ".join(cell(by[m].get(n), std=True) for m in by) + " |" for n in ns]
        out += [""] + [f"* {k}: {cell(v)}" for k, v in res["paired"]["upper_bound"].items()] + [""]
    if "unpaired" in res:
        out += ["| method (0 pairs) | raw | +whitening | seconds (raw / whitened) |", "|---|---|---|---|"]
        for k, v in res["unpaired"].items():
            if k.endswith("+whitening"):
                continue
            w = res["unpaired"].get(k + "+whitening")
            sec = " / ".join(str(x.get("seconds", "")) for x in (v, w) if x)
            out.append(f"| {k} | {cell(v)} | {cell(w) if w else '-'} | {sec} |")
        out.append("")
    for part in ("curve", "steps"):
        for k, by_n in res.get(part, {}).items():
            out.append(f"* {part} {k}: " + "; ".join(f"{int(n):,}: {cell(r)}" for n, r in sorted(
                by_n.items(), key=lambda t: int(t[0]))))
    for part in ("diagnose", "planted"):
        out += [f"* {part} {k}: {cell(v)}" for k, v in res.get(part, {}).items()]
    prev = res.get("pca_start_previous", {})
    for part in ("unpaired", "planted"):
        out += [f"* previous (PCA start) {part} {k}: {cell(v)}" for k, v in prev.get(part, {}).items()]
    for k, by_n in prev.get("curve", {}).items():
        out.append(f"* previous (PCA start) curve {k}: " + "; ".join(f"{int(n):,}: {cell(r)}" for n, r in sorted(
            by_n.items(), key=lambda t: int(t[0]))))
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------------

def splits(mini: torch.Tensor, mp: torch.Tensor, per_side: int = UNPAIRED) -> dict[str, Any]:
    if len(mp) != len(mini) or len(mini) < EVAL + 2 * per_side:
        raise SystemExit(f"need both models on >= {EVAL + 2 * per_side} common rows; got MiniLM {len(mini)}, "
                         f"MPNet {len(mp)} (re-run bench/real_text_data.py without --rows)")
    train = len(mini) - EVAL
    S = {"a_pool": mini[:train], "b_pool": mp[:train], "a_eval": mini[train:], "b_eval": mp[train:],
         "a_un": mini[:per_side], "b_un": mp[per_side:2 * per_side]}  # unpaired: disjoint item sets
    S["whiten"] = Whiten(S["a_un"], S["b_un"])
    S["info"] = {"rows": len(mini), "eval_items": [train, len(mini)], "paired_pool_items": [0, train],
                 "unpaired_minilm_items": [0, per_side], "unpaired_mpnet_items": [per_side, 2 * per_side],
                 "whitening_fitted_on": "each model's own unpaired training set"}
    return S


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="the directory bench/real_text_data.py wrote")
    p.add_argument("--out", default="bench/results/real_text.json")
    p.add_argument("--plot", default="docs/alignment_real_text.png")
    p.add_argument("--parts", default="paired,unpaired,curve,steps,diagnose,planted")
    p.add_argument("--anchors", default="10,30,100,300,1000,3000")
    p.add_argument("--draws", type=int, default=3, help="seeded anchor draws per count")
    p.add_argument("--mlp-steps", type=int, default=300)
    p.add_argument("--unpaired", default="mnn_procrustes,mnn_procrustes_robust,sinkhorn_procrustes,vec2vec,vec2vec_init")
    p.add_argument("--variants", default="raw,whiten", help="raw and/or whiten (both sides whitened first)")
    p.add_argument("--curve-methods", default="mnn_procrustes_robust,mnn_procrustes_robust+whitening")
    p.add_argument("--curve-sizes", default="2048,4096,8192,12288")
    p.add_argument("--steps", type=int, default=300, help="vec2vec steps in the unpaired table")
    p.add_argument("--step-curve", default="100,1000",
                   help="vec2vec (plain) steps for the steps curve; the unpaired table's row adds --steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--diagnose-anchors", default="300,24576")
    p.add_argument("--diagnose-robust-anchors", default="24576", help="of those, also refined by robust MNN")
    p.add_argument("--planted-methods", default="mnn_procrustes_robust")
    p.add_argument("--per-side", type=int, default=UNPAIRED, help="unpaired training vectors a side")
    p.add_argument("--map-dir", help="where robust MNN maps are kept for vec2vec_init (default CACHE/maps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tables", action="store_true", help="print --out's results as markdown tables and exit")
    p.add_argument("--replot", action="store_true", help="redraw --plot from --out and exit")
    a = p.parse_args(argv)
    if a.tables:
        print(tables(json.loads(Path(a.out).read_text())))
        return 0
    if a.replot:
        print(plot(json.loads(Path(a.out).read_text()), a.plot))
        return 0
    torch.set_num_threads(a.threads)
    t_start, load0 = time.time(), os.getloadavg()
    cache = Path(a.cache)
    mini = torch.from_numpy(np.load(cache / "minilm.npy")).float()
    mp = torch.from_numpy(np.load(cache / "mpnet.npy")).float()
    S = splits(mini, mp, a.per_side)
    v2v = {"steps": a.steps, "batch_size": a.batch_size, "hidden_dim": a.hidden}
    fitters = unpaired_fitters(v2v, Path(a.map_dir) if a.map_dir else cache / "maps")
    res: dict[str, Any] = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    if res and "splits" not in res:  # the previous session's partial rows (old splits): kept apart, not merged
        res = {"previous_session_partial": res}
    res.update({"what": __doc__.split("\n")[0], "splits": S["info"], "paper": PAPER})
    parts = a.parts.split(",")
    run_log = {"argv": sys.argv[1:] if argv is None else argv, "parts": parts, "torch_threads": a.threads,
               "loadavg_start": load0, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:
        run_log.update(loadavg_end=os.getloadavg(), wall_s=round(time.time() - t_start, 1))
        res["runs"] = [r for r in res.get("runs", []) if r.get("started") != run_log["started"]] + [run_log]
        write_json_atomic(a.out, res)

    variants = a.variants.split(",")
    if "paired" in parts:
        log("paired: Procrustes / +whitening / least squares / ridge / MLP vs anchors")
        res["paired"] = paired_part(S, ints(a.anchors), a.draws, a.mlp_steps)
        save()
    if "unpaired" in parts:
        log(f"unpaired: {a.per_side} MiniLM vs {a.per_side} MPNet vectors of disjoint items, 0 pairs")
        res.setdefault("unpaired", {}).update(unpaired_part(S, fitters, a.unpaired.split(","), variants))
        res["unpaired_config"] = {"vec2vec": v2v, "vectors_a_side": a.per_side}
        save()
    if "curve" in parts:
        log("curve: unpaired top-1 vs vectors a side")
        for k, v in curve_part(S, fitters, a.curve_methods.split(","), ints(a.curve_sizes)).items():
            res.setdefault("curve", {})[k] = v
            save()
    if "steps" in parts:
        log("steps: plain vec2vec top-1 vs steps")
        curve = steps_part(S, fitters, ints(a.step_curve), init=False)
        table_row = res.get("unpaired", {}).get("vec2vec")
        if table_row and "top1" in table_row and str(table_row.get("steps")) not in curve["vec2vec"]:
            curve["vec2vec"][str(table_row["steps"])] = table_row  # same split and settings: reuse, not retrain
        for k, v in curve.items():  # merged by step count: a later run can add counts
            res.setdefault("steps", {}).setdefault(k, {}).update(v)
        save()
    if "diagnose" in parts:
        log("diagnose: unpaired MNN refinement started from a paired map")
        res.setdefault("diagnose", {}).update(diagnose_part(S, ints(a.diagnose_anchors),
                                                            ints(a.diagnose_robust_anchors)))
        save()
    if "planted" in parts:
        log(f"planted control: MiniLM -> its own random rotation, {a.per_side} disjoint vectors a side")
        res["planted"] = planted_part(mini, fitters, a.planted_methods.split(","), a.per_side)
        save()
    save()
    if a.plot and plot(res, a.plot):
        log(f"wrote {a.plot}")
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
