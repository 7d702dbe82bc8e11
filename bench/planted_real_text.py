"""Planted cases on real MiniLM embeddings, no pairs: MNN-Procrustes and vec2vec started from it.

    python bench/planted_real_text.py --cache C --part rotation --shipped --threads 1
    python bench/planted_real_text.py --cache C --part nonlinear --nonlinear 0.1 --shipped --threads 1
    python bench/planted_real_text.py --cache C --part nonlinear --nonlinear 0.2 --shipped --threads 1
    python bench/planted_real_text.py --cache C --part rotation --out bench/results/planted_real_text.json
    python bench/planted_real_text.py --cache C --part nonlinear --nonlinear 0.3
    python bench/planted_real_text.py --cache C --part curve --sizes 1024,2048,4096,8192

``--shipped`` (key ``<part>_<n>_a_side[_eps]_shipped``): robust MNN-Procrustes (the start), that map after
``soft_procrustes`` (linear), ``train_vec2vec``'s defaults end to end (robust start, soft refinement,
adversarial/cycle/VSP training, best step by unsupervised score), the same training's last step
(no selection), and plain vec2vec from a random start (``init=None``) for as many steps.

The target is MiniLM itself, ``normalize(R x)`` (``rotation``) or ``normalize(R normalize(x + eps tanh(3 W x)))``
(``nonlinear``), learned from disjoint training halves of the cached glosses (``C/minilm.npy``, written by
bench/real_text_data.py) and scored on the last 8,192 rows (held out from both halves) among 8,192
shuffled candidates. ``vec2vec_init_mnn`` is the initialised variant (translator started from the
MNN-Procrustes map), not the paper's plain method. ``curve``: MNN-Procrustes top-1 vs vectors per side.
Results are merged into ``--out`` under one key per run (written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualenc.plugins.checks import FewAnchorsWarning
from dualenc.plugins.crossmodel import translation_metrics
from dualenc.plugins.study import write_json_atomic
from dualenc.plugins.translate import soft_procrustes, train_vec2vec
from dualenc.plugins.unpaired import fit_mnn_procrustes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_real_text import EVAL, planted_target  # noqa: E402  (one definition of the planted target)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mnn(a: torch.Tensor, b: torch.Tensor, robust: bool = False):
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewAnchorsWarning)
        m = fit_mnn_procrustes(a.double(), b.double(), robust=robust)
    return m, time.time() - t0


def scored(fn, a_eval, b_eval, **extra) -> dict[str, Any]:
    with torch.no_grad():
        r = {**translation_metrics(fn(a_eval).float(), b_eval.float()), **extra}
    log("    " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--out", default="bench/results/planted_real_text.json")
    p.add_argument("--part", choices=("rotation", "nonlinear", "curve"), required=True)
    p.add_argument("--per-side", type=int, default=8192)
    p.add_argument("--nonlinear", type=float, default=0.3)
    p.add_argument("--sizes", default="1024,2048,4096,8192")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="vec2vec learning rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--robust", action="store_true", help="MNN-Procrustes with CSLS + stochastic dictionary induction")
    p.add_argument("--no-vec2vec", action="store_true")
    p.add_argument("--shipped", action="store_true", help="the shipped train_vec2vec defaults (see the docstring)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    mini = torch.from_numpy(np.load(Path(a.cache) / "minilm.npy")).float()
    a_eval = mini[-EVAL:]
    nl = a.nonlinear if a.part == "nonlinear" else 0.0
    b_eval = planted_target(a_eval, nl)
    res: dict[str, Any] = {"config": vars(a), "loadavg_start": os.getloadavg(), "eval_rows": EVAL, "_t0": time.time(),
                           "identity": scored(lambda x: x, a_eval, b_eval)}
    if a.part == "curve":
        for n in (int(s) for s in a.sizes.split(",")):
            log(f"curve: MNN-Procrustes, {n} vectors a side (disjoint halves), rotation")
            m, sec = mnn(mini[:n], planted_target(mini[n:2 * n]), a.robust)
            res[str(n)] = scored(lambda x: m.apply(x.double()), a_eval, b_eval, seconds=sec,
                                 mnn_pairs=m.meta.extra["mnn_pairs"], iterations=m.meta.extra["iterations"])
            res["loadavg_end"] = os.getloadavg()
            _merge(a.out, "mnn_learning_curve_rotation" + ("_robust" if a.robust else ""), res)
        return 0
    n = a.per_side
    xa, xb = mini[:n], planted_target(mini[n:2 * n], nl)
    if a.shipped:
        return shipped(a, res, xa, xb, a_eval, b_eval, nl)
    log(f"{a.part} (eps {nl}): MNN-Procrustes, {n} vectors a side, disjoint, no pairs")
    m, sec = mnn(xa, xb, a.robust)
    res["mnn_procrustes" + ("_robust" if a.robust else "")] = scored(lambda x: m.apply(x.double()), a_eval, b_eval, seconds=sec,
                                   mnn_pairs=m.meta.extra["mnn_pairs"], iterations=m.meta.extra["iterations"])
    key = f"{a.part}_{n}_a_side" + (f"_eps{nl}" if nl else "") + ("_robust" if a.robust else "") \
        + (f"_lr{a.lr:g}" if a.lr != 1e-3 else "")
    _merge(a.out, key, res)
    if a.no_vec2vec:
        return 0
    log(f"vec2vec from the MNN map: {a.steps} steps, hidden {a.hidden}, batch {a.batch_size}")
    t0 = time.time()
    # The earlier rows' set-up: no soft refinement, no step selection (the shipped default is --shipped).
    v, hist = train_vec2vec(xa, xb, init=m, refine=0, select=False, steps=a.steps, hidden_dim=a.hidden,
                            batch_size=a.batch_size, lr=a.lr,
                            log_every=max(1, a.steps // 5))
    res["vec2vec_init_mnn" + ("_robust" if a.robust else "")] = scored(lambda x: v.apply(x.float()), a_eval, b_eval, seconds=time.time() - t0,
                                     steps=a.steps, losses=hist)
    res["loadavg_end"] = os.getloadavg()
    _merge(a.out, key, res)
    return 0


def shipped(a: argparse.Namespace, res: dict[str, Any], xa: torch.Tensor, xb: torch.Tensor, a_eval: torch.Tensor,
            b_eval: torch.Tensor, nl: float) -> int:
    n = len(xa)
    key = f"{a.part}_{n}_a_side" + (f"_eps{nl}" if nl else "") + "_shipped"
    v2v = dict(steps=a.steps, hidden_dim=a.hidden, batch_size=a.batch_size)
    log(f"{a.part} (eps {nl}): robust MNN-Procrustes (the start), {n} vectors a side, disjoint, no pairs")
    m, sec = mnn(xa, xb, robust=True)
    res["robust_mnn_start"] = scored(lambda x: m.apply(x.double()), a_eval, b_eval, seconds=sec)
    t0 = time.time()
    q = soft_procrustes(xa, xb, m.q.float(), m.means["image_source"].float(), m.means["image_target"].float())
    ma, mb = m.means["image_source"].float(), m.means["image_target"].float()
    res["soft_procrustes_refined"] = scored(lambda x: (x - ma) @ q.T + mb, a_eval, b_eval, seconds=time.time() - t0)
    _merge(a.out, key, res)
    for name, kw in (("vec2vec_default", {}), ("vec2vec_last_step", {"select": False})):
        log(f"{name}: from the robust map, {a.steps} steps, hidden {a.hidden}, batch {a.batch_size} {kw}")
        t0 = time.time()
        v, _ = train_vec2vec(xa, xb, init=m, **v2v, **kw)
        res[name] = scored(lambda x: v.apply(x.float()), a_eval, b_eval, seconds=time.time() - t0,
                           selected_step=v.meta.extra["selected_step"],
                           checks=[round(c["score"], 5) for c in v.meta.extra["checks"]])
        _merge(a.out, key, res)
    res["vec2vec_default"]["seconds_with_start"] = res["vec2vec_default"]["seconds"] + sec
    log(f"vec2vec_plain: random start (init=None), {a.steps} steps")
    t0 = time.time()
    v, _ = train_vec2vec(xa, xb, init=None, select=False, **v2v)
    res["vec2vec_plain"] = scored(lambda x: v.apply(x.float()), a_eval, b_eval, seconds=time.time() - t0)
    res["loadavg_end"] = os.getloadavg()
    res["wall_seconds"] = time.time() - res.pop("_t0")
    _merge(a.out, key, res)
    return 0


def _merge(path: str, key: str, value: dict[str, Any]) -> None:
    old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    old[key] = {k: v for k, v in value.items() if k != "_t0"}
    write_json_atomic(path, old)


if __name__ == "__main__":
    sys.exit(main())
