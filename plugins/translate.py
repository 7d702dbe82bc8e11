"""Unpaired embedding translation, vec2vec-style (Jha et al., "Harnessing the Universal Geometry of Embeddings").

Input adapters ``A_a``, ``A_b`` into a shared latent, a shared backbone ``T``, output adapters
``B_a``, ``B_b``; every block an MLP with a residual connection, LayerNorm and SiLU. Trained on two
*unpaired* sets with: adversarial losses on both output spaces and on the latents, reconstruction,
cycle consistency, and vector-space preservation (pairwise similarities within a batch kept).
GAN training is unstable (the paper keeps the best of several seeds): ``train_vec2vec`` is seeded, and
``train_vec2vec_best`` trains several seeds and keeps the one with the lowest unsupervised score
(``unsupervised_score``: cycle consistency, vector-space preservation and an MMD between translated and
real embeddings of each space; no pairs are used).
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
from dualenc.progress import progress


class ResidualBlock(nn.Module):
    """x -> x' + Linear(SiLU(LayerNorm(Linear(x)))), with x' a projection when the width changes."""

    def __init__(self, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, d_out))
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def mlp(d_in: int, d_out: int, hidden: int, depth: int) -> nn.Sequential:
    dims = [d_in] + [hidden] * (depth - 1) + [d_out]
    return nn.Sequential(*(ResidualBlock(dims[i], dims[i + 1], hidden) for i in range(depth)))


@dataclass
class Vec2VecConfig:
    dim_a: int
    dim_b: int
    latent_dim: int = 64
    hidden_dim: int = 128
    adapter_depth: int = 1
    backbone_depth: int = 2


class Vec2Vec(nn.Module):
    def __init__(self, cfg: Vec2VecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_dim
        self.in_a = mlp(cfg.dim_a, cfg.latent_dim, h, cfg.adapter_depth)
        self.in_b = mlp(cfg.dim_b, cfg.latent_dim, h, cfg.adapter_depth)
        self.backbone = mlp(cfg.latent_dim, cfg.latent_dim, h, cfg.backbone_depth)
        self.out_a = mlp(cfg.latent_dim, cfg.dim_a, h, cfg.adapter_depth)
        self.out_b = mlp(cfg.latent_dim, cfg.dim_b, h, cfg.adapter_depth)

    def latent(self, x: torch.Tensor, space: str) -> torch.Tensor:
        return self.backbone((self.in_a if space == "a" else self.in_b)(x))

    def decode(self, z: torch.Tensor, space: str) -> torch.Tensor:
        return F.normalize((self.out_a if space == "a" else self.out_b)(z), dim=-1)

    def translate(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        return self.decode(self.latent(x, src), dst)


def discriminator(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, 1))


@dataclass
class Vec2VecLossWeights:
    adversarial: float = 1.0  # output spaces
    latent_adversarial: float = 1.0
    reconstruction: float = 1.0
    cycle: float = 1.0
    vsp: float = 1.0  # vector-space preservation


def _gan_g(d: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(d(fake), torch.ones(fake.shape[0], 1, device=fake.device))


def _gan_d(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    r, f = d(real), d(fake.detach())
    return 0.5 * (F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
                  + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)))


def _vsp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ x.T - y @ y.T).pow(2).mean()


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
    def fit_embeddings(cls, source: Any, target: Any, **kwargs: Any) -> "Vec2VecMap":
        """CLI entry; ``seeds: [0, 1, 2]`` in the arguments trains each and keeps the best (``train_vec2vec_best``)."""
        fit = train_vec2vec_best if "seeds" in kwargs else train_vec2vec
        return fit(source.get("image"), target.get("image"), source=source.model, target=target.model, **kwargs)[0]


def train_vec2vec(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    source: Any = None,
    target: Any = None,
    latent_dim: int = 64,
    hidden_dim: int = 128,
    adapter_depth: int = 1,
    backbone_depth: int = 2,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    disc_lr: float | None = None,
    weights: Vec2VecLossWeights | dict[str, float] | None = None,
    seed: int = 0,
    log_every: int = 0,
) -> tuple[Vec2VecMap, list[dict[str, float]]]:
    """Train on unpaired sets ``a`` (N, dim_a) and ``b`` (M, dim_b); returns the a->b map and a loss log."""
    xa = F.normalize(as_matrix(a, "space a embeddings", torch.float32), dim=-1)
    xb = F.normalize(as_matrix(b, "space b embeddings", torch.float32), dim=-1)
    if min(len(xa), len(xb)) < 2:
        raise ValueError("vec2vec needs at least 2 embeddings per space")
    w = weights if isinstance(weights, Vec2VecLossWeights) else Vec2VecLossWeights(**(weights or {}))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = Vec2VecConfig(xa.shape[1], xb.shape[1], latent_dim, hidden_dim, adapter_depth, backbone_depth)
        net = Vec2Vec(cfg)
        d_a, d_b, d_lat = discriminator(cfg.dim_a, hidden_dim), discriminator(cfg.dim_b, hidden_dim), \
            discriminator(latent_dim, hidden_dim)
    opt_g = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters(), *d_lat.parameters()], lr=disc_lr or lr,
                             betas=(0.5, 0.999))
    bs = min(batch_size, len(xa), len(xb))
    log: list[dict[str, float]] = []
    for step in progress(range(steps), desc="vec2vec fit", unit="step"):
        ba = xa[torch.randint(len(xa), (bs,), generator=g)]
        bb = xb[torch.randint(len(xb), (bs,), generator=g)]
        za, zb = net.latent(ba, "a"), net.latent(bb, "b")
        ab, ba_ = net.decode(za, "b"), net.decode(zb, "a")  # translations
        terms = {
            "adversarial": _gan_g(d_b, ab) + _gan_g(d_a, ba_),
            # Each space's latents should look like the other's to the latent discriminator.
            "latent_adversarial": F.binary_cross_entropy_with_logits(d_lat(za), torch.zeros(bs, 1))
            + F.binary_cross_entropy_with_logits(d_lat(zb), torch.ones(bs, 1)),
            "reconstruction": (net.decode(za, "a") - ba).pow(2).sum(-1).mean()
            + (net.decode(zb, "b") - bb).pow(2).sum(-1).mean(),
            "cycle": (net.translate(ab, "b", "a") - ba).pow(2).sum(-1).mean()
            + (net.translate(ba_, "a", "b") - bb).pow(2).sum(-1).mean(),
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
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.append({"step": step, "loss": loss.item(), "disc": d_loss.item(),
                        **{k: v.item() for k, v in terms.items()}})
    meta = MapMeta(kind=Vec2VecMap.kind, source=_model_id(source, "source", cfg.dim_a),
                   target=_model_id(target, "target", cfg.dim_b), anchors=0,
                   extra={"method": "vec2vec", "config": dataclasses.asdict(cfg), "direction": "ab",
                          "steps": steps, "seed": seed, "weights": dataclasses.asdict(w),
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
        m, _ = train_vec2vec(a, b, seed=s, **kwargs)
        inv = m.inverse()
        sc = unsupervised_score(m.apply, inv.apply, a, b, n=score_rows)
        runs.append(m)
        scores.append({"seed": s, **sc})
    best = min(range(len(seeds)), key=lambda i: scores[i]["score"])
    chosen = runs[best]
    chosen.meta.extra["selection"] = {"criterion": "unsupervised_score (cycle + vsp + mmd)", "chosen_seed": seeds[best],
                                      "scores": scores}
    return chosen, scores
