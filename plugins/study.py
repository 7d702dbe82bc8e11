"""The cross-model alignment study's building blocks: pure functions on embedding tensors.

``bench/study_alignment.py`` trains two models, embeds the data with both and calls these. The
question (the canonical-map paper's claim): does an orthogonal ``Q`` fitted on *image* anchors only
also map *text*, and does it beat a general linear map / an MLP on text even where those fit the
images better? Plus: how well do unpaired methods translate one model's text embeddings into the other's?

All maps go from model A's space to model B's; every metric is computed in B's space.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from dualenc import fileio
from dualenc.plugins.baselines import fit_linear, fit_mlp, fit_sinkhorn_procrustes
from dualenc.plugins.checks import FewAnchorsWarning
from dualenc.plugins.crossmodel import translation_metrics, zero_shot_accuracy
from dualenc.plugins.procrustes import fit_procrustes
from dualenc.plugins.translate import train_vec2vec, unsupervised_score
from dualenc.plugins.unpaired import fit_mnn_procrustes

MapFn = Callable[[torch.Tensor, str], torch.Tensor]
#: (A image anchors, B image anchors, A text (means only), B text (means only)) -> map A -> B
Fitter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], MapFn]


@dataclass
class EvalSet:
    """One model's embeddings of the held-out items; rows line up between the two models' sets.

    ``class_text`` row ``c`` is the caption of class ``c`` (the class of ``image`` row i is
    ``image_class[i]``); ``classifiers`` are prompt-ensembled zero-shot heads, named like ``zeroshot``.
    """

    image: torch.Tensor  # (N, D)
    image_class: torch.Tensor  # (N,) long
    class_text: torch.Tensor  # (C, D)
    text: torch.Tensor  # (M, D) held-out captions, for text transfer
    classifiers: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (K, D)


ZeroShotSets = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (image row indices, labels in 0..K-1)


# -- maps ---------------------------------------------------------------------------------------------

def identity_map(dim_b: int) -> MapFn:
    """The "before" reference: A's embeddings as they are, truncated or zero-padded to ``dim_b``.

    Between independently trained models this is a chance-level reference, not a map.
    """
    def fn(x: torch.Tensor, modality: str) -> torch.Tensor:
        if x.shape[1] >= dim_b:
            return x[:, :dim_b]
        return F.pad(x, (0, dim_b - x.shape[1]))
    return fn


def _as_fn(m: Any, text_modality: bool = True) -> MapFn:
    # A map's ``apply`` checks shapes; float32 out so every method is scored alike.
    return lambda x, mod: m.apply(x, mod if text_modality else "image").float()


def default_methods(mlp_steps: int = 500, mlp_hidden: int = 256, ridge: float = 1e-3,
                    seed: int = 0) -> dict[str, Fitter]:
    """The paired methods, each fitted on image anchors; text gets its own means (see ``fit_procrustes``).

    ``procrustes_image_means`` maps text with the *image* means: what is left with no text at all.
    """
    def quiet(fit: Callable[[], Any]) -> Any:
        with warnings.catch_warnings():  # few anchors for the dims is the point of the sweep
            warnings.simplefilter("ignore", FewAnchorsWarning)
            return fit()

    def procrustes(xa, xb, ta, tb):
        return _as_fn(quiet(lambda: fit_procrustes(xa, xb, source_text=ta, target_text=tb)))

    def procrustes_image_means(xa, xb, ta, tb):
        return _as_fn(quiet(lambda: fit_procrustes(xa, xb)), text_modality=False)

    def linear(xa, xb, ta, tb):
        return _as_fn(quiet(lambda: fit_linear(xa, xb, source_text=ta, target_text=tb)))

    def linear_ridge(xa, xb, ta, tb):
        return _as_fn(quiet(lambda: fit_linear(xa, xb, source_text=ta, target_text=tb, ridge=ridge)))

    def mlp(xa, xb, ta, tb):
        return _as_fn(fit_mlp(xa, xb, source_text=ta, target_text=tb, hidden=mlp_hidden, steps=mlp_steps, seed=seed))

    def identity(xa, xb, ta, tb):
        return identity_map(xb.shape[1])

    return {"identity": identity, "procrustes": procrustes, "procrustes_image_means": procrustes_image_means,
            "linear": linear, "linear_ridge": linear_ridge, "mlp": mlp}


# -- metrics ------------------------------------------------------------------------------------------

def class_retrieval(queries: torch.Tensor, query_class: torch.Tensor, index: torch.Tensor,
                    index_class: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Class-level retrieval: a hit when a top-k index row has the query's class (captions name classes).

    ``R@k``: some row of the top k has the right class; ``P@k`` (k > 1): the fraction of the top k that has.
    """
    if queries.shape[1] != index.shape[1]:
        raise ValueError(f"queries are {queries.shape[1]}-dim but the index is {index.shape[1]}-dim")
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(index.float(), dim=-1).T
    k_max = min(max(ks), index.shape[0])
    top = sims.topk(k_max, dim=1).indices
    hit = index_class[top] == query_class[:, None]
    out = {f"R@{k}": float(hit[:, :k].any(1).float().mean()) for k in ks if k <= k_max}
    out.update({f"P@{k}": float(hit[:, :k].float().mean()) for k in ks if 1 < k <= k_max})
    return out


def evaluate_map(fn: MapFn, a: EvalSet, b: EvalSet, zeroshot: ZeroShotSets | None = None) -> dict[str, float]:
    """A -> B map scored in B's space: transfer (cosine, top-1) per modality, retrieval both ways, zero-shot."""
    img, txt, cls_txt = fn(a.image, "image"), fn(a.text, "text"), fn(a.class_text, "text")
    out: dict[str, float] = {}
    for tag, pred, true in (("image", img, b.image), ("text", txt, b.text), ("class_text", cls_txt, b.class_text)):
        t = translation_metrics(pred, true)
        out.update({f"{tag}/cos": t["mean_cosine"], f"{tag}/top1": t["top1"], f"{tag}/mean_rank": t["mean_rank"]})
    classes = torch.arange(len(b.class_text))
    # B's own text queries against A's images mapped into B, and A's text mapped against B's images.
    for tag, q, idx in (("b_text->a_image", b.class_text, img), ("a_text->b_image", cls_txt, b.image)):
        out.update({f"{tag}/{k}": v for k, v in class_retrieval(q, classes, idx, a.image_class).items()})
    for name, (rows, labels) in (zeroshot or {}).items():
        zs = zero_shot_accuracy(img[rows], labels, b.classifiers[name])
        out.update({f"zeroshot/{name}/{k}": v for k, v in zs.items()})
    return out


def reference_metrics(a: EvalSet, b: EvalSet, zeroshot: ZeroShotSets | None = None) -> dict[str, float]:
    """Each model alone (its own text vs its own images): what a perfect map could reach at most."""
    out: dict[str, float] = {}
    classes = torch.arange(len(b.class_text))
    for tag, s in (("a", a), ("b", b)):
        out.update({f"{tag}/text->image/{k}": v
                    for k, v in class_retrieval(s.class_text, classes, s.image, s.image_class).items()})
        for name, (rows, labels) in (zeroshot or {}).items():
            out.update({f"{tag}/zeroshot/{name}/{k}": v
                        for k, v in zero_shot_accuracy(s.image[rows], labels, s.classifiers[name]).items()})
    return out


# -- the anchor sweep ---------------------------------------------------------------------------------

def anchor_subsets(pool: int, sizes: Sequence[int], repeats: int, seed: int = 0) -> list[tuple[int, int, torch.Tensor]]:
    """``(size, repeat, row indices)`` for each size and repeat: seeded, without replacement."""
    if any(s < 2 or s > pool for s in sizes):
        raise ValueError(f"anchor sizes must be in [2, {pool}] (the pool size), got {list(sizes)}")
    out = []
    for size in sizes:
        for r in range(repeats):
            g = torch.Generator().manual_seed(seed * 1_000_003 + size * 1009 + r)
            out.append((size, r, torch.randperm(pool, generator=g)[:size]))
    return out


def anchor_sweep(a_anchor: torch.Tensor, b_anchor: torch.Tensor, a_eval: EvalSet, b_eval: EvalSet,
                 sizes: Sequence[int], repeats: int = 3, methods: dict[str, Fitter] | None = None,
                 text_means: tuple[torch.Tensor, torch.Tensor] | None = None, zeroshot: ZeroShotSets | None = None,
                 anchor_class: torch.Tensor | None = None, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Fit every method on each seeded subset of the paired image anchors; score each on the held-out set.

    ``text_means``: (A, B) embeddings of one text set, used only for the per-modality text means
    (no image-text pairing). Returns one record per (method, size, repeat).
    """
    if a_anchor.shape[0] != b_anchor.shape[0]:
        raise ValueError("anchor rows must pair up: the same images embedded by A and by B")
    methods = methods if methods is not None else default_methods(seed=seed)
    ta, tb = text_means if text_means is not None else (None, None)
    records = []
    for size, rep, rows in anchor_subsets(len(a_anchor), sizes, repeats, seed):
        classes = int(anchor_class[rows].unique().numel()) if anchor_class is not None else None
        for name, fit in methods.items():
            fn = fit(a_anchor[rows], b_anchor[rows], ta, tb)
            rec = {"method": name, "anchors": size, "repeat": rep, "anchor_classes": classes,
                   **evaluate_map(fn, a_eval, b_eval, zeroshot)}
            records.append(rec)
        if log:
            last = {r["method"]: r for r in records[-len(methods):]}
            log(f"anchors={size} rep={rep}: " + ", ".join(
                f"{m} img {r['image/cos']:.3f} txt {r['text/cos']:.3f}" for m, r in last.items()))
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{method: {anchors: {metric: {mean, std, n}}}}`` over repeats (anchors as a string key, for JSON)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["anchors"]), []).append(r)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (method, size), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        keys = [k for k, v in rs[0].items() if isinstance(v, (int, float)) and k not in ("anchors", "repeat")]
        stats = {}
        for k in keys:
            vals = torch.tensor([float(r[k]) for r in rs if r.get(k) is not None], dtype=torch.float64)
            if len(vals):
                stats[k] = {"mean": float(vals.mean()), "std": float(vals.std()) if len(vals) > 1 else 0.0,
                            "n": len(vals)}
        out.setdefault(method, {})[str(size)] = stats
    return out


# -- unpaired translation -----------------------------------------------------------------------------

def unpaired_study(a_train: torch.Tensor, b_train: torch.Tensor, a_eval: torch.Tensor, b_eval: torch.Tensor, *,
                   paired_a: torch.Tensor | None = None, paired_b: torch.Tensor | None = None,
                   vec2vec_seeds: Sequence[int] = (0,), vec2vec_steps: int = 2000,
                   vec2vec_kwargs: dict | None = None,
                   sinkhorn_kwargs: dict | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Translate A -> B without pairs: ``a_train`` and ``b_train`` should be *different* items.

    Scored on the paired held-out ``a_eval``/``b_eval`` (vec2vec's mean cosine, top-1, mean rank).
    ``paired_a``/``paired_b`` (optional, the same items by both models) add an oracle: Procrustes on pairs.
    Each vec2vec seed is reported; ``vec2vec/mean`` averages them (no seed picked by its test score), and
    ``vec2vec/selected`` is the seed ``train_vec2vec_best`` would keep: the lowest ``unsupervised_score`` on the
    training sets (no pairs), i.e. what a user who cannot evaluate on pairs gets.
    """
    def score(fn: MapFn) -> dict[str, float]:
        return translation_metrics(fn(a_eval, "image").float(), b_eval)

    out: dict[str, dict[str, float]] = {"identity": score(identity_map(b_eval.shape[1]))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewAnchorsWarning)
        mnn = fit_mnn_procrustes(a_train, b_train)
    out["mnn_procrustes"] = {**score(_as_fn(mnn)), "mnn_pairs": float(mnn.meta.extra["mnn_pairs"])}
    sk = fit_sinkhorn_procrustes(a_train, b_train, **(sinkhorn_kwargs or {}))
    out["sinkhorn_procrustes"] = score(_as_fn(sk))
    if log:
        log(f"unpaired: mnn {out['mnn_procrustes']['mean_cosine']:.3f}, sinkhorn "
            f"{out['sinkhorn_procrustes']['mean_cosine']:.3f}")
    runs, selection = [], []
    for s in vec2vec_seeds:
        m, _ = train_vec2vec(a_train, b_train, steps=vec2vec_steps, seed=s, **(vec2vec_kwargs or {}))
        runs.append(score(_as_fn(m)))
        # The same score (and defaults) train_vec2vec_best selects by; computed here to keep every seed's map.
        selection.append(unsupervised_score(m.apply, m.inverse().apply, a_train, b_train)["score"])
        out[f"vec2vec/seed{s}"] = {**runs[-1], "unsupervised_score": selection[-1]}
        if log:
            log(f"unpaired: vec2vec seed {s}: {runs[-1]['mean_cosine']:.3f} top1 {runs[-1]['top1']:.3f} "
                f"unsupervised score {selection[-1]:.4f}")
    if runs:
        out["vec2vec/mean"] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        best = min(range(len(runs)), key=selection.__getitem__)
        out["vec2vec/selected"] = {**runs[best], "seed": float(vec2vec_seeds[best])}
    if paired_a is not None and paired_b is not None:
        oracle = fit_procrustes(paired_a, paired_b, on_few_anchors="warn")
        out["oracle_paired_procrustes"] = score(_as_fn(oracle))
    return out


# -- output -------------------------------------------------------------------------------------------

def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Results JSON, atomically; insertion order and indent 1 keep committed results' diffs readable."""
    return fileio.write_json_atomic(path, obj, indent=1, sort_keys=False)


def plot_sweep(summary: dict[str, dict[str, dict[str, dict[str, float]]]], metrics: Sequence[tuple[str, str]],
               path: str | Path, methods: Sequence[str] | None = None, references: dict[str, float] | None = None,
               title: str | None = None) -> Path:
    """One panel per ``(metric key, label)``: mean +- std over repeats vs anchor count (log x), per method.

    ``references`` draws horizontal lines (``"metric key|label" -> value``), e.g. model B alone.
    Written atomically (a temporary file, then ``os.replace``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(methods or summary)
    cols = 2 if len(metrics) == 4 else min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics):
        for m in methods:
            sizes = sorted(summary[m], key=int)
            pts = [(int(s), summary[m][s][key]) for s in sizes if key in summary[m][s]]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            mean = torch.tensor([p[1]["mean"] for p in pts])
            std = torch.tensor([p[1]["std"] for p in pts])
            line, = ax.plot(xs, mean.tolist(), marker="o", ms=3, label=m)
            ax.fill_between(xs, (mean - std).tolist(), (mean + std).tolist(), color=line.get_color(), alpha=0.15)
        labels = sorted({r.partition("|")[2] for r in references or {}})
        for ref, value in (references or {}).items():
            ref_key, _, ref_label = ref.partition("|")
            if ref_key == key:  # one line style per reference label, e.g. "A alone" / "B alone"
                ax.axhline(value, color="k", ls=("--", ":", "-.")[labels.index(ref_label) % 3], lw=0.9,
                           label=ref_label or "reference")
        ax.set_xscale("log")
        ticks = sorted({int(s) for m in methods for s in summary[m]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("image anchors")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in list(axes.flat)[1:len(metrics)]:  # collect reference lines drawn in other panels too
        hs, labs = ax.get_legend_handles_labels()
        for h, lab in zip(hs, labs):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(len(seen), 4), fontsize=8,
               bbox_to_anchor=(0.5, -0.01))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


__all__ = ["EvalSet", "Fitter", "MapFn", "ZeroShotSets", "anchor_subsets", "anchor_sweep", "class_retrieval",
           "default_methods", "evaluate_map", "identity_map", "plot_sweep", "reference_metrics", "summarize",
           "unpaired_study", "write_json_atomic"]
