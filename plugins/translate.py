"""Unpaired embedding translation, vec2vec-style (Jha et al., "Harnessing the Universal Geometry of Embeddings").

Input adapters ``A_a``, ``A_b`` into a shared latent, a shared backbone ``T``, output adapters
``B_a``, ``B_b``; every block an MLP with a residual connection, LayerNorm and SiLU. Trained on two
*unpaired* sets with: adversarial losses on both output spaces and on the latents, reconstruction,
cycle consistency, and vector-space preservation (pairwise similarities within a batch kept).
GAN training is unstable (the paper keeps the best of several seeds): ``train_vec2vec`` is seeded, and
``train_vec2vec_best`` trains several seeds and keeps the one with the lowest unsupervised score
(``unsupervised_score``: cycle consistency, vector-space preservation and an MMD between translated and
real embeddings of each space; no pairs are used).

From the paper's random start, these losses do not recover even a planted rotation of real MiniLM
embeddings on CPU budgets (measured: docs/alignment.md). ``train_vec2vec``'s default therefore starts
from an unpaired matching (robust MNN-Procrustes from VecMap's similarity-profile start, refined by
``soft_procrustes``) and keeps the training step with the best unsupervised score; ``init=None`` is the
plain method.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualenc.plugins.checks import as_matrix
from dualenc.plugins.mapfile import MapMeta
from dualenc.plugins.maps import EmbeddingMap, Modality
from dualenc.plugins.procrustes import _model_id
from dualenc.progress import progress as progress_bar


class ResidualBlock(nn.Module):
    """x -> skip(x) + Linear(SiLU(LayerNorm(Linear(x)))).

    ``skip`` is the identity, or a bias-free linear map initialised (semi-)orthogonal when the width
    changes: a norm-preserving path through every block, so the untrained net is close to a rotation and
    not a shrinking random projection. The body's last layer starts at zero (``zero_body``): every
    block starts linear, and the nonlinearity is learned on top (the net can start from a given map).
    """

    def __init__(self, d_in: int, d_out: int, hidden: int, zero_body: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, d_out))
        if zero_body:
            nn.init.zeros_(self.body[-1].weight)
            nn.init.zeros_(self.body[-1].bias)
        self.skip: nn.Module = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        if isinstance(self.skip, nn.Linear):
            nn.init.orthogonal_(self.skip.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def mlp(d_in: int, d_out: int, hidden: int, depth: int, zero_body: bool = True) -> nn.Sequential:
    dims = [d_in] + [max(d_in, d_out)] * (depth - 1) + [d_out]
    return nn.Sequential(*(ResidualBlock(dims[i], dims[i + 1], hidden, zero_body) for i in range(depth)))


@dataclass
class Vec2VecConfig:
    dim_a: int
    dim_b: int
    latent_dim: int = 512
    hidden_dim: int = 512
    adapter_depth: int = 1
    backbone_depth: int = 1
    zero_body: bool = True


class Vec2Vec(nn.Module):
    """Adapters ``in_a``/``in_b`` -> shared latent -> backbone -> adapters ``out_a``/``out_b``.

    Each space is first viewed in a common frame of ``frame = max(dim_a, dim_b)`` coordinates:
    ``(x - mean) @ frame_x`` (a fixed buffer with orthonormal rows, so the view loses nothing), and
    written back with the transpose plus the mean. The frames are zero-padded identities unless an
    unpaired starting map is given (``init_from_map``): then b's frame is rotated onto a's, and the
    untrained translator (skips only, zero bodies) applies exactly that map.
    """

    def __init__(self, cfg: Vec2VecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, z, f = cfg.hidden_dim, cfg.latent_dim, max(cfg.dim_a, cfg.dim_b)
        self.in_a = mlp(f, z, h, cfg.adapter_depth, cfg.zero_body)
        self.in_b = mlp(f, z, h, cfg.adapter_depth, cfg.zero_body)
        self.backbone = mlp(z, z, h, cfg.backbone_depth, cfg.zero_body)
        self.out_a = mlp(z, f, h, cfg.adapter_depth, cfg.zero_body)
        self.out_b = mlp(z, f, h, cfg.adapter_depth, cfg.zero_body)
        self._tie_skips()
        self.register_buffer("frame_a", torch.eye(cfg.dim_a, f))
        self.register_buffer("frame_b", torch.eye(cfg.dim_b, f))
        self.register_buffer("mean_a", torch.zeros(cfg.dim_a))
        self.register_buffer("mean_b", torch.zeros(cfg.dim_b))

    @torch.no_grad()
    def _tie_skips(self) -> None:
        """Same skip projections on both sides, decoders' the transposes of encoders': with zero bodies
        the net starts as the identity between the two frames (whatever the latent width)."""
        for enc, dec in ((self.in_a, self.out_a), (self.in_b, self.out_b)):
            for blk_in, blk_out in zip(enc, reversed(dec)):
                if isinstance(blk_in.skip, nn.Linear) and isinstance(blk_out.skip, nn.Linear):
                    blk_out.skip.weight.copy_(blk_in.skip.weight.T)
        for one, other in ((self.in_a, self.in_b), (self.out_a, self.out_b)):
            for blk_a, blk_b in zip(one, other):
                if isinstance(blk_a.skip, nn.Linear) and isinstance(blk_b.skip, nn.Linear):
                    blk_b.skip.weight.copy_(blk_a.skip.weight)

    @torch.no_grad()
    def init_from_map(self, q: torch.Tensor, mean_a: torch.Tensor, mean_b: torch.Tensor) -> None:
        """Start from the affine map ``y = (x - mean_a) Q^T + mean_b`` (``Q``: dim_b x dim_a,
        orthonormal rows or columns)."""
        f = self.frame_a.shape[1]
        q = q.to(self.frame_b.dtype)
        fb = q  # (dim_b, dim_a = f): orthonormal rows when b is not wider
        if q.shape[1] < f:  # b is wider: complete Q's columns to an orthogonal basis of b
            u, _, _ = torch.linalg.svd(q, full_matrices=True)
            fb = torch.cat([q, u[:, q.shape[1]:]], dim=1)
        self.frame_b.copy_(fb)
        self.mean_a.copy_(mean_a.to(self.mean_a.dtype))
        self.mean_b.copy_(mean_b.to(self.mean_b.dtype))

    def latent(self, x: torch.Tensor, space: str) -> torch.Tensor:
        if space == "a":
            return self.backbone(self.in_a((x - self.mean_a) @ self.frame_a))
        return self.backbone(self.in_b((x - self.mean_b) @ self.frame_b))

    def decode(self, z: torch.Tensor, space: str) -> torch.Tensor:
        if space == "a":
            return F.normalize(self.out_a(z) @ self.frame_a.T + self.mean_a, dim=-1)
        return F.normalize(self.out_b(z) @ self.frame_b.T + self.mean_b, dim=-1)

    def translate(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        return self.decode(self.latent(x, src), dst)


def discriminator(d: int, hidden: int, depth: int = 3) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d, hidden), nn.LeakyReLU(0.2)]
    for _ in range(depth - 2):
        layers += [nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(hidden, 1))


@dataclass
class Vec2VecLossWeights:
    adversarial: float = 1.0  # output spaces
    latent_adversarial: float = 1.0
    reconstruction: float = 1.0
    cycle: float = 10.0  # the public code weights cycle consistency 10x
    vsp: float = 1.0  # vector-space preservation


def _gan_g(d: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN (the public code's choice for unsupervised runs): push D(fake) to the real label."""
    return (d(fake) - 1.0).pow(2).mean()


def _gan_d(d: nn.Module, real: torch.Tensor, fake: torch.Tensor, smooth: float = 0.9) -> torch.Tensor:
    return 0.5 * ((d(real) - smooth).pow(2).mean() + d(fake.detach()).pow(2).mean())


def _cos_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(x, y, dim=-1)).mean()


def _vsp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ x.T - y @ y.T).abs().mean()


class Vec2VecMap(EmbeddingMap):
    """A trained ``Vec2Vec`` as a map from space ``a`` (source) to ``b`` (target); ``inverse()`` is b->a."""

    kind: ClassVar[str] = "vec2vec"

    def __init__(self, net: Vec2Vec, meta: MapMeta, direction: str = "ab") -> None:
        super().__init__(meta)
        self.net = net.eval()
        self.direction = direction

    def _apply(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        p = next(self.net.parameters())
        src, dst = self.direction
        with torch.no_grad():
            return self.net.translate(F.normalize(x.to(p.device, p.dtype), dim=-1), src, dst).to(x.dtype)

    def inverse(self) -> "Vec2VecMap":
        meta = dataclasses.replace(self.meta, source=self.meta.target or self.meta.source, target=self.meta.source,
                                   extra=dict(self.meta.extra, direction=self.direction[::-1]))
        return Vec2VecMap(self.net, meta, self.direction[::-1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v for k, v in self.net.state_dict().items()}

    @classmethod
    def from_tensors(cls, meta: MapMeta, tensors: dict[str, torch.Tensor]) -> "Vec2VecMap":
        net = Vec2Vec(Vec2VecConfig(**meta.extra["config"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
        return cls(net, meta, meta.extra.get("direction", "ab"))

    @classmethod
    def fit_embeddings(cls, source: Any, target: Any, modality: str = "image", **kwargs: Any) -> "Vec2VecMap":
        """CLI entry (``train_vec2vec``'s defaults: a robust MNN-Procrustes start, not a random one; ``init: null``
        in the arguments for the plain method); ``seeds: [0, 1, 2]`` trains each and keeps the best
        (``train_vec2vec_best``)."""
        fit = train_vec2vec_best if "seeds" in kwargs else train_vec2vec
        return fit(source.get(modality), target.get(modality), source=source.model, target=target.model,
                   **kwargs)[0]


def initial_map(xa: torch.Tensor, xb: torch.Tensor, init: Any,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(Q, mean_a, mean_b) of an unpaired starting map: ``"robust_mnn"`` (MNN-Procrustes with CSLS and
    stochastic dictionary induction, seeded), ``"mnn"`` (the plain mutual-NN loop), ``"sinkhorn"``, an
    ``OrthogonalMap``, or None / ``"none"`` (no initial map: plain vec2vec)."""
    if init is None or init == "none":
        return None
    if isinstance(init, str):
        from dualenc.plugins import unpaired

        if init in ("mnn", "robust_mnn"):
            m = unpaired.fit_mnn_procrustes(xa.double(), xb.double(), robust=init == "robust_mnn", seed=seed,
                                            on_few_anchors="warn")
        elif init == "sinkhorn":
            from dualenc.plugins.baselines import fit_sinkhorn_procrustes

            m = fit_sinkhorn_procrustes(xa.double(), xb.double())
        else:
            raise ValueError(f"init must be 'robust_mnn', 'mnn', 'sinkhorn', 'none' or an OrthogonalMap, got {init!r}")
    else:
        m = init
    return m.q.float(), m.means["image_source"].float(), m.means["image_target"].float()


@torch.no_grad()
def soft_procrustes(xa: torch.Tensor, xb: torch.Tensor, q: torch.Tensor, mean_a: torch.Tensor, mean_b: torch.Tensor,
                    temperature: float = 0.1, rounds: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Self-learning refinement of an unpaired orthogonal map: Procrustes on *soft* matches.

    Each round maps the centred ``xa`` by ``q``, turns cosine similarities to the centred ``xb`` into a
    row softmax plus a column softmax at ``temperature`` (every point weighted over its likely partners
    both ways, instead of one hard nearest neighbour), and refits ``q`` to that weighted cross-covariance.
    Hard (mutual or CSLS) neighbour pairs between two *disjoint* sets are near misses; averaging over
    them estimates the map better (planted MiniLM rotation + nonlinearity: mean cosine 0.949 -> 0.969).
    Chunked: memory is ``chunk`` x len(xb).
    """
    xc, yc = (xa - mean_a).float(), (xb - mean_b).float()
    yn = F.normalize(yc, dim=-1)
    q = q.float()
    for _ in range(rounds):
        xn = F.normalize(xc @ q.T, dim=-1)
        col_lse = torch.full((len(yc),), -float("inf"))
        for s in range(0, len(xn), chunk):  # pass 1: each column's log-normalizer
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(xn[s:s + chunk] @ yn.T / temperature, dim=0))
        m = torch.zeros(yc.shape[1], xc.shape[1])
        for s in range(0, len(xn), chunk):  # pass 2: the weighted cross-covariance sum_ij w_ij y_j x_i^T
            logits = xn[s:s + chunk] @ yn.T / temperature
            w = torch.softmax(logits, dim=1) + torch.exp(logits - col_lse)
            m += (w @ yc).T @ xc[s:s + chunk]
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        q = u @ vh
    return q


def train_vec2vec(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    source: Any = None,
    target: Any = None,
    latent_dim: int | None = None,
    hidden_dim: int = 512,
    adapter_depth: int = 1,
    backbone_depth: int = 1,
    steps: int = 300,
    batch_size: int = 256,
    lr: float | None = None,
    disc_lr: float | None = None,
    weights: Vec2VecLossWeights | dict[str, float] | None = None,
    init: Any = "robust_mnn",
    refine: int = 3,
    refine_temperature: float = 0.1,
    select: bool = True,
    score_rows: int = 1024,
    seed: int = 0,
    log_every: int = 0,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> tuple[Vec2VecMap, list[dict[str, float]]]:
    """Train on unpaired sets ``a`` (N, dim_a) and ``b`` (M, dim_b); returns the a->b map and a loss log.

    The default is **vec2vec started from an unpaired matching, not the paper's random start**:
    ``init="robust_mnn"`` fits MNN-Procrustes from similarity profiles, with CSLS and stochastic
    dictionary induction (``fit_mnn_procrustes(robust=True)``; no pairs; seeded by ``seed``), ``refine`` rounds of ``soft_procrustes`` improve it, the translator starts as
    exactly that map (zero-initialised bodies), and the adversarial/cycle/VSP losses then train the
    nonlinear adapters. ``init=None`` is the paper's plain random start; on CPU budgets it stays at
    chance even on a planted rotation of real MiniLM embeddings (docs/alignment.md), because only the
    adversarial terms can find the rotation and they give no usable signal from a random start.
    ``select``: every ``steps // 10`` steps (and at step 0) the translator's ``unsupervised_score`` on
    ``score_rows`` training rows is computed and the lowest-scoring step is returned (no pairs used);
    GAN training from a correct start drifts (measured), so this keeps the start unless training helps.
    ``lr`` defaults to 1e-3 from a random start and 1e-4 from a map. ``latent_dim`` defaults to the
    larger embedding dim (a 64-d bottleneck is what kept the old default from undoing a rotation).
    ``init`` may also be ``"mnn"``, ``"sinkhorn"`` or a fitted ``OrthogonalMap``. ``progress`` gets each
    logged row (the CLI prints it).
    """
    xa = F.normalize(as_matrix(a, "space a embeddings", torch.float32), dim=-1)
    xb = F.normalize(as_matrix(b, "space b embeddings", torch.float32), dim=-1)
    if min(len(xa), len(xb)) < 2:
        raise ValueError("vec2vec needs at least 2 embeddings per space")
    w = weights if isinstance(weights, Vec2VecLossWeights) else Vec2VecLossWeights(**(weights or {}))
    start = initial_map(xa, xb, init, seed)
    if start is not None and refine > 0:
        start = (soft_procrustes(xa, xb, *start, temperature=refine_temperature, rounds=refine), *start[1:])
    lr = lr if lr is not None else (1e-3 if start is None else 1e-4)
    g = torch.Generator().manual_seed(seed)
    z = int(latent_dim or max(xa.shape[1], xb.shape[1]))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = Vec2VecConfig(xa.shape[1], xb.shape[1], z, hidden_dim, adapter_depth, backbone_depth)
        net = Vec2Vec(cfg)
        d_a, d_b, d_lat = discriminator(cfg.dim_a, hidden_dim), discriminator(cfg.dim_b, hidden_dim), \
            discriminator(z, hidden_dim)
    if start is not None:
        net.init_from_map(*start)
    opt_g = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters(), *d_lat.parameters()], lr=disc_lr or lr,
                             betas=(0.5, 0.999))
    bs = min(batch_size, len(xa), len(xb))
    check_every = max(1, steps // 10)
    checks: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def check(step: int) -> None:
        nonlocal best
        net.eval()
        sc = unsupervised_score(lambda x: net.translate(x, "a", "b"), lambda y: net.translate(y, "b", "a"), xa, xb,
                                n=score_rows, seed=seed)
        net.train()
        checks.append({"step": step, **sc})
        if best is None or sc["score"] < best[0]:
            best = (sc["score"], step, copy.deepcopy(net.state_dict()))

    log: list[dict[str, float]] = []
    net.train()
    if select:
        check(0)
    for step in progress_bar(range(steps), desc="vec2vec fit", unit="step"):
        ba = xa[torch.randint(len(xa), (bs,), generator=g)]
        bb = xb[torch.randint(len(xb), (bs,), generator=g)]
        za, zb = net.latent(ba, "a"), net.latent(bb, "b")
        ab, ba_ = net.decode(za, "b"), net.decode(zb, "a")  # translations
        terms = {
            "adversarial": _gan_g(d_b, ab) + _gan_g(d_a, ba_),
            # Each space's latents should look like the other's to the latent discriminator.
            "latent_adversarial": _gan_g(d_lat, za) + (d_lat(zb)).pow(2).mean(),
            "reconstruction": _cos_loss(net.decode(za, "a"), ba) + _cos_loss(net.decode(zb, "b"), bb),
            "cycle": _cos_loss(net.translate(ab, "b", "a"), ba) + _cos_loss(net.translate(ba_, "a", "b"), bb),
            "vsp": _vsp(ab, ba) + _vsp(ba_, bb),
        }
        loss = sum(getattr(w, k) * v for k, v in terms.items())
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d_loss = _gan_d(d_b, bb, ab) + _gan_d(d_a, ba, ba_) + _gan_d(d_lat, za.detach(), zb.detach())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if select and ((step + 1) % check_every == 0 or step == steps - 1):
            check(step + 1)
        if log_every and (step % log_every == 0 or step == steps - 1):
            row = {"step": step, "loss": loss.item(), "disc": d_loss.item(), **{k: v.item() for k, v in terms.items()}}
            log.append(row)
            if progress is not None:
                progress(row)
    if best is not None:
        net.load_state_dict(best[2])
    meta = MapMeta(kind=Vec2VecMap.kind, source=_model_id(source, "source", cfg.dim_a),
                   target=_model_id(target, "target", cfg.dim_b), anchors=0,
                   extra={"method": "vec2vec", "config": dataclasses.asdict(cfg), "direction": "ab",
                          "steps": steps, "seed": seed, "weights": dataclasses.asdict(w), "lr": lr,
                          "init": init if isinstance(init, str) or init is None else "map",
                          "refine": refine if start is not None else 0,
                          "selected_step": best[1] if best is not None else steps, "checks": checks,
                          "source_count": len(xa), "target_count": len(xb)})
    return Vec2VecMap(copy.deepcopy(net).eval(), meta), log


Translate = Callable[[torch.Tensor], torch.Tensor]


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel (biased estimator); the bandwidth defaults to
    the median pairwise distance within ``y`` (the real embeddings)."""
    dyy = torch.cdist(y, y)
    if bandwidth is None:
        off = dyy[~torch.eye(len(y), dtype=torch.bool)]
        bandwidth = float(off.median()) if off.numel() else 1.0
    gamma = 1.0 / (2 * max(bandwidth, 1e-6) ** 2)
    k = lambda d: torch.exp(-gamma * d.pow(2)).mean()  # noqa: E731
    return float(k(torch.cdist(x, x)) + k(dyy) - 2 * k(torch.cdist(x, y)))


@torch.no_grad()
def unsupervised_score(a_to_b: Translate, b_to_a: Translate, a: torch.Tensor, b: torch.Tensor, n: int = 1024,
                       seed: int = 0) -> dict[str, float]:
    """How well a translator pair fits two *unpaired* sets, without any pair: lower is better.

    ``cycle``: a -> b -> a (and back) returns the input; ``vsp``: pairwise similarities survive the
    translation; ``mmd``: translated a looks like real b (and back), which the other two cannot see (an
    identity "translation" has no cycle or vsp error). ``score`` is their sum. Up to ``n`` rows per side
    (seeded sample) keep it cheap.
    """
    g = torch.Generator().manual_seed(seed)
    xa = F.normalize(as_matrix(a, "space a embeddings", torch.float32), dim=-1)
    xb = F.normalize(as_matrix(b, "space b embeddings", torch.float32), dim=-1)
    xa = xa[torch.randperm(len(xa), generator=g)[:n]]
    xb = xb[torch.randperm(len(xb), generator=g)[:n]]
    ab, ba = F.normalize(a_to_b(xa).float(), dim=-1), F.normalize(b_to_a(xb).float(), dim=-1)
    cycle = float((F.normalize(b_to_a(ab).float(), dim=-1) - xa).pow(2).sum(-1).mean()
                  + (F.normalize(a_to_b(ba).float(), dim=-1) - xb).pow(2).sum(-1).mean())
    vsp = float(_vsp(ab, xa) + _vsp(ba, xb))
    mmd = mmd2(ab, xb) + mmd2(ba, xa)
    return {"cycle": cycle, "vsp": vsp, "mmd": mmd, "score": cycle + vsp + mmd}


def train_vec2vec_best(a: torch.Tensor, b: torch.Tensor, *, seeds: Sequence[int] = (0, 1, 2), score_rows: int = 1024,
                       **kwargs: Any) -> tuple[Vec2VecMap, list[dict[str, float]]]:
    """``train_vec2vec`` once per seed; keep the run with the lowest ``unsupervised_score`` on the training sets.

    Returns the chosen map (its metadata records every seed's score under ``selection``) and the per-seed
    scores. No pair is used: this is the selection an unpaired user can make.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("give at least one seed")
    if "seed" in kwargs:
        raise ValueError("give `seeds` (a list) to select among, not `seed`")
    runs, scores = [], []
    for s in seeds:
        m, _ = train_vec2vec(a, b, seed=s, score_rows=score_rows, **kwargs)
        inv = m.inverse()
        sc = unsupervised_score(m.apply, inv.apply, a, b, n=score_rows)
        runs.append(m)
        scores.append({"seed": s, **sc})
    best = min(range(len(seeds)), key=lambda i: scores[i]["score"])
    chosen = runs[best]
    chosen.meta.extra["selection"] = {"criterion": "unsupervised_score (cycle + vsp + mmd)", "chosen_seed": seeds[best],
                                      "scores": scores}
    return chosen, scores
