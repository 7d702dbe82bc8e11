"""Comparison maps for the canonical-map claim: what an orthogonal ``Q`` is measured against.

All are fitted on the same paired *image* anchors as ``fit_procrustes`` and applied to text too (the
canonical-map paper's test: a map that fits images better may transfer worse to text):

* ``LinearMap`` (``linear``): a general affine map, least squares with a bias (``torch.linalg.lstsq``;
  optional ridge). With fewer anchors than dimensions it is the minimum-norm solution.
* ``MLPMap`` (``mlp``): a 2-layer MLP trained with Adam on the anchors (seeded).
* ``fit_sinkhorn_procrustes`` (``sinkhorn_procrustes``): an *unpaired* optimal-transport baseline,
  Wasserstein-Procrustes (Grave et al.): alternate an entropic transport plan between the mapped
  source and the target with a Procrustes refit on that plan. Its maps are ``procrustes`` maps.

Like ``OrthogonalMap``, each modality is centred with its own means when text means are given
(``source_text``/``target_text``): only the linear/nonlinear part differs between the methods. Without
text means, text goes through the image-fitted affine map as is.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from dualenc.plugins.checks import as_matrix, check_anchor_count, check_paired
from dualenc.plugins.mapfile import MapMeta, ModelId
from dualenc.plugins.maps import EmbeddingMap, Modality
from dualenc.plugins.procrustes import OrthogonalMap, _model_id, modality_means
from dualenc.plugins.registry import PLUGINS
from dualenc.plugins.unpaired import pca_init
from dualenc.progress import progress


class _CentredMap(EmbeddingMap):
    """Shared by the baselines: ``map(x) = core(x - mu_source[m]) + mu_target[m]``.

    A modality without its own means uses the image means (the image-fitted affine map as is).
    """

    def __init__(self, means: dict[str, torch.Tensor], meta: MapMeta) -> None:
        super().__init__(meta)
        self.means = means

    def _core(self, xc: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        m = modality if f"{modality}_source" in self.means else "image"
        mu_s = self.means[f"{m}_source"].to(x.device, x.dtype)
        mu_t = self.means[f"{m}_target"].to(x.device, x.dtype)
        return self._core(x - mu_s) + mu_t

    def _mean_tensors(self) -> dict[str, torch.Tensor]:
        return {f"mean_{k}": v for k, v in self.means.items()}

    @staticmethod
    def _means_from(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len("mean_"):]: v for k, v in tensors.items() if k.startswith("mean_")}


class LinearMap(_CentredMap):
    """A general linear map ``W`` (dim_t, dim_s) on centred embeddings: an affine map with the means."""

    kind: ClassVar[str] = "linear"

    def __init__(self, w: torch.Tensor, means: dict[str, torch.Tensor], meta: MapMeta) -> None:
        super().__init__(means, meta)
        self.w = w

    def _core(self, xc: torch.Tensor) -> torch.Tensor:
        return xc @ self.w.to(xc.device, xc.dtype).T

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"W": self.w, **self._mean_tensors()}

    @classmethod
    def from_tensors(cls, meta: MapMeta, tensors: dict[str, torch.Tensor]) -> "LinearMap":
        return cls(tensors["W"], cls._means_from(tensors), meta)

    @classmethod
    def fit_embeddings(cls, source: Any, target: Any, **kwargs: Any) -> "LinearMap":
        """CLI entry: ``source``/``target`` are ``EmbeddingSet``s with paired image rows (and text)."""
        return fit_linear(source.get("image"), target.get("image"), source_text=source.arrays.get("text"),
                          target_text=target.arrays.get("text"), source=source.model, target=target.model, **kwargs)


def fit_linear(
    source_image: torch.Tensor,
    target_image: torch.Tensor,
    *,
    source_text: torch.Tensor | None = None,
    target_text: torch.Tensor | None = None,
    source: ModelId | str | None = None,
    target: ModelId | str | None = None,
    ridge: float = 0.0,
    on_few_anchors: Literal["warn", "error"] = "warn",
    dtype: torch.dtype = torch.float64,
) -> LinearMap:
    """Least squares ``y ~ W x + b`` on paired image anchors (the bias is the pair of image means).

    ``ridge`` adds ``ridge * n * ||W||^2`` (scaled by the anchor count, so one value suits any ``n``).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x = as_matrix(source_image, "source image anchors", dtype)
    y = as_matrix(target_image, "target image anchors", dtype)
    check_paired(x, y, "source image anchors", "target image anchors")
    check_anchor_count(x.shape[0], x.shape[1], "linear (least-squares) fit", on_few_anchors)
    means = modality_means(x, y, source_text, target_text, dtype)
    xc, yc = x - means["image_source"], y - means["image_target"]
    if ridge > 0:
        a = xc.T @ xc + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=dtype)
        w = torch.linalg.solve(a, xc.T @ yc).T
    else:
        # gelsd: SVD-based, gives the minimum-norm solution when the anchors are fewer than the dims.
        w = torch.linalg.lstsq(xc, yc, driver="gelsd").solution.T
    resid = float((xc @ w.T - yc).norm() / yc.norm().clamp_min(1e-30))
    meta = MapMeta(kind=LinearMap.kind, source=_model_id(source, "source", x.shape[1]),
                   target=_model_id(target, "target", y.shape[1]), anchors=x.shape[0],
                   extra={"method": "linear", "ridge": ridge, "relative_residual": resid,
                          "modalities": sorted({k.split("_")[0] for k in means})})
    return LinearMap(w.contiguous(), means, meta)


def _mlp(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class MLPMap(_CentredMap):
    """A 2-layer MLP on centred embeddings (float32), plus the per-modality means."""

    kind: ClassVar[str] = "mlp"

    def __init__(self, net: nn.Sequential, means: dict[str, torch.Tensor], meta: MapMeta) -> None:
        super().__init__(means, meta)
        self.net = net.eval()

    def _core(self, xc: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(xc.float()).to(xc.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"net.{k}": v for k, v in self.net.state_dict().items()}, **self._mean_tensors()}

    @classmethod
    def from_tensors(cls, meta: MapMeta, tensors: dict[str, torch.Tensor]) -> "MLPMap":
        net = _mlp(int(meta.source.dim or 0), int(meta.target.dim or 0) if meta.target else 0, meta.extra["hidden"])
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
        return cls(net, cls._means_from(tensors), meta)

    @classmethod
    def fit_embeddings(cls, source: Any, target: Any, **kwargs: Any) -> "MLPMap":
        return fit_mlp(source.get("image"), target.get("image"), source_text=source.arrays.get("text"),
                       target_text=target.arrays.get("text"), source=source.model, target=target.model, **kwargs)


def fit_mlp(
    source_image: torch.Tensor,
    target_image: torch.Tensor,
    *,
    source_text: torch.Tensor | None = None,
    target_text: torch.Tensor | None = None,
    source: ModelId | str | None = None,
    target: ModelId | str | None = None,
    hidden: int = 256,
    steps: int = 500,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> MLPMap:
    """Train ``Linear -> GELU -> Linear`` with Adam (full batch, MSE) on centred paired image anchors."""
    if hidden < 1 or steps < 1:
        raise ValueError(f"hidden and steps must be >= 1, got hidden={hidden}, steps={steps}")
    x = as_matrix(source_image, "source image anchors", torch.float32)
    y = as_matrix(target_image, "target image anchors", torch.float32)
    check_paired(x, y, "source image anchors", "target image anchors")
    check_anchor_count(x.shape[0], 1, "MLP fit")  # any n >= 2 trains; fit quality is what the study measures
    means = modality_means(x, y, source_text, target_text, torch.float32)
    xc, yc = x - means["image_source"], y - means["image_target"]
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        net = _mlp(x.shape[1], y.shape[1], hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in progress(range(steps), desc="MLP fit", unit="step"):
            loss = (net(xc) - yc).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        resid = float((net(xc) - yc).norm() / yc.norm().clamp_min(1e-30))
    meta = MapMeta(kind=MLPMap.kind, source=_model_id(source, "source", x.shape[1]),
                   target=_model_id(target, "target", y.shape[1]), anchors=x.shape[0],
                   extra={"method": "mlp", "hidden": hidden, "steps": steps, "lr": lr, "seed": seed,
                          "weight_decay": weight_decay, "relative_residual": resid,
                          "modalities": sorted({k.split("_")[0] for k in means})})
    return MLPMap(net, means, meta)


# -- unpaired: entropic optimal transport + Procrustes ---------------------------------------------------

PLAN_TOL = 1e-3


def sinkhorn_plan(cost: torch.Tensor, epsilon: float, iters: int = 200, tol: float = 1e-5) -> torch.Tensor:
    """Entropic OT plan (uniform marginals) for a cost matrix, in the log domain (stable for small eps).

    Stops early once the row marginals are within ``tol`` (relative, max over rows) of uniform: most
    calls converge in a few dozen iterations, and running all ``iters`` is what made the defaults slow.
    Inside Sinkhorn-/GW-Procrustes a plan only weights a Procrustes fit: ``PLAN_TOL`` (looser) is enough.
    """
    n, m = cost.shape
    log_a = torch.full((n,), -torch.log(torch.tensor(float(n))).item(), dtype=cost.dtype)
    log_b = torch.full((m,), -torch.log(torch.tensor(float(m))).item(), dtype=cost.dtype)
    k = -cost / epsilon
    f = torch.zeros(n, dtype=cost.dtype)
    g = torch.zeros(m, dtype=cost.dtype)
    for i in range(iters):
        f = log_a - torch.logsumexp(k + g[None, :], dim=1)
        g = log_b - torch.logsumexp(k + f[:, None], dim=0)
        if tol and i % 5 == 4:  # after the g update columns are exact; check rows
            row = torch.logsumexp(k + f[:, None] + g[None, :], dim=1) - log_a
            if float(row.abs().max()) < tol:
                break
    return torch.exp(k + f[:, None] + g[None, :])


def gromov_wasserstein_plan(cx: torch.Tensor, cy: torch.Tensor, epsilon: float = 0.005, iters: int = 30,
                            sinkhorn_iters: int = 100) -> torch.Tensor:
    """Entropic Gromov-Wasserstein plan between two similarity matrices (square loss, uniform marginals).

    Compares the two sets' *internal* geometry only, so it needs no initial map: a rotation-free start
    for Wasserstein-Procrustes (which from a bad start sticks in a local optimum).
    """
    n, m = cx.shape[0], cy.shape[0]
    plan = torch.full((n, m), 1.0 / (n * m), dtype=cx.dtype)
    for _ in range(iters):
        cost = -(cx @ plan @ cy) * n  # the square loss' linearization, up to constants; O(1) scale
        plan = sinkhorn_plan(cost - cost.min(), epsilon, sinkhorn_iters, PLAN_TOL)
    return plan


def fit_sinkhorn_procrustes(
    source_emb: torch.Tensor,
    target_emb: torch.Tensor,
    *,
    source_text: torch.Tensor | None = None,
    target_text: torch.Tensor | None = None,
    source: Any = None,
    target: Any = None,
    init: Literal["auto", "gw", "pca", "identity"] = "auto",
    iters: int = 10,
    epsilon: float = 0.05,
    sinkhorn_iters: int = 100,
    max_points: int = 512,
    gw_epsilon: float = 0.005,
    gw_iters: int = 10,
    seed: int = 0,
) -> OrthogonalMap:
    """Unpaired orthogonal map between two sets of *different* items of one distribution.

    Both sides are centred and L2-normalized; each round computes the OT plan ``P`` between
    ``x Q^T`` and ``y`` (cost ``1 - cos``) and refits ``Q`` on the cross-covariance ``y^T P^T x``.
    The start: ``init='gw'`` fits ``Q`` on a Gromov-Wasserstein plan (geometry only, no map needed);
    ``'pca'`` matches principal axes as ``fit_mnn_procrustes`` does; ``'auto'`` refines from both and
    keeps the cheaper final transport. At most ``max_points`` rows per side are used (dense plans); the
    transport is computed in float32 (the plans need no more) and the final map refitted in float64.
    """
    if epsilon <= 0 or iters < 1:
        raise ValueError(f"epsilon must be > 0 and iters >= 1, got epsilon={epsilon}, iters={iters}")
    x = as_matrix(source_emb, "source embeddings")
    y = as_matrix(target_emb, "target embeddings")
    if min(len(x), len(y)) < 2:
        raise ValueError("Sinkhorn-Procrustes needs at least 2 embeddings per side")
    mx, my = x.mean(0), y.mean(0)
    g = torch.Generator().manual_seed(seed)
    xs = (x - mx)[torch.randperm(len(x), generator=g)[:max_points]]
    ys = (y - my)[torch.randperm(len(y), generator=g)[:max_points]]
    xs, ys = torch.nn.functional.normalize(xs, dim=-1).float(), torch.nn.functional.normalize(ys, dim=-1).float()
    starts = ("gw", "pca") if init == "auto" else (init,)
    if any(s not in ("gw", "pca", "identity") for s in starts):
        raise ValueError(f"init must be 'auto', 'gw', 'pca' or 'identity', got {init!r}")
    fits = {}
    for start in starts:
        if start == "gw":
            q0 = _plan_procrustes(xs, ys, gromov_wasserstein_plan(xs @ xs.T, ys @ ys.T, gw_epsilon, gw_iters))
        elif start == "pca":
            q0 = pca_init(xs, ys, seed=seed)
        else:
            q0 = torch.eye(y.shape[1], x.shape[1], dtype=xs.dtype)
        fits[start] = _wasserstein_procrustes(xs, ys, q0.to(xs.dtype), epsilon, iters, sinkhorn_iters)
    # Both refinements are local: keep the one whose final transport is cheapest (no labels used).
    best = min(fits, key=lambda k: fits[k][1])
    q, cost, done = fits[best]
    plan = sinkhorn_plan(1.0 - (xs @ q.T) @ ys.T, epsilon, sinkhorn_iters, PLAN_TOL)
    q = _plan_procrustes(xs.to(x.dtype), ys.to(x.dtype), plan.to(x.dtype))
    means = {"image_source": mx, "image_target": my}
    if source_text is not None and target_text is not None:
        means["text_source"] = as_matrix(source_text, "source text").mean(0)
        means["text_target"] = as_matrix(target_text, "target text").mean(0)
    meta = MapMeta(kind=OrthogonalMap.kind, source=_model_id(source, "source", x.shape[1]),
                   target=_model_id(target, "target", y.shape[1]), anchors=0,
                   extra={"method": "sinkhorn_procrustes", "init": init, "chosen_init": best, "iterations": done,
                          "transport_cost": {k: v[1] for k, v in fits.items()}, "epsilon": epsilon,
                          "points": [len(xs), len(ys)], "source_count": x.shape[0], "target_count": y.shape[0]})
    return OrthogonalMap(q, means, meta)


def _wasserstein_procrustes(xs: torch.Tensor, ys: torch.Tensor, q: torch.Tensor, epsilon: float, iters: int,
                            sinkhorn_iters: int) -> tuple[torch.Tensor, float, int]:
    """Alternate OT plan and Procrustes from ``q``; returns (Q, final transport cost, rounds)."""
    done = 0
    for done in range(1, iters + 1):
        plan = sinkhorn_plan(1.0 - (xs @ q.T) @ ys.T, epsilon, sinkhorn_iters, PLAN_TOL)
        q_new = _plan_procrustes(xs, ys, plan)
        converged = bool((q_new - q).norm() < 1e-4 * q.norm())
        q = q_new
        if converged:
            break
    cost = 1.0 - (xs @ q.T) @ ys.T
    return q, float((sinkhorn_plan(cost, epsilon, sinkhorn_iters, PLAN_TOL) * cost).sum()), done


def _plan_procrustes(xs: torch.Tensor, ys: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """``Q = U V^T`` from the SVD of the plan-weighted cross-covariance ``sum_ij P_ij y_j x_i^T``."""
    u, _, vh = torch.linalg.svd(ys.T @ plan.T @ xs, full_matrices=False)
    return u @ vh


class SinkhornProcrustes:
    """Registry entry for ``dualenc align fit --method sinkhorn_procrustes``; its maps are ``procrustes`` maps."""

    kind: ClassVar[str] = "sinkhorn_procrustes"

    @staticmethod
    def fit_embeddings(source: Any, target: Any, **kwargs: Any) -> OrthogonalMap:
        return fit_sinkhorn_procrustes(source.get("image"), target.get("image"), source_text=source.arrays.get("text"),
                                       target_text=target.arrays.get("text"), source=source.model,
                                       target=target.model, **kwargs)


BASELINES: dict[str, Any] = {"linear": LinearMap, "mlp": MLPMap, "sinkhorn_procrustes": SinkhornProcrustes}


def register_baselines(registry: Any = PLUGINS) -> None:
    """Add the baselines to the plugin registry (idempotent: importing twice must not fail)."""
    for name, obj in BASELINES.items():
        if name not in registry._items:  # noqa: SLF001 - ``in`` would also match a third party's entry point
            registry.register(name, obj)


register_baselines()

__all__ = ["BASELINES", "LinearMap", "MLPMap", "SinkhornProcrustes", "fit_linear", "fit_mlp",
           "fit_sinkhorn_procrustes", "gromov_wasserstein_plan", "register_baselines", "sinkhorn_plan"]
