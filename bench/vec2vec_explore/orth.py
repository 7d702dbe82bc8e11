# Orthogonal linear generator (torch orthogonal parametrization), loss: gan (LSGAN/BCE) or mmd; PCA-reduced planted case.
import argparse
from common import *
from torch.nn.utils.parametrizations import orthogonal
from dualenc.plugins.synthetic import random_orthogonal
p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=4096); p.add_argument("--iters", type=int, default=3000)
p.add_argument("--bs", type=int, default=256); p.add_argument("--dsteps", type=int, default=1)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--dlr", type=float, default=1e-3)
p.add_argument("--hid", type=int, default=256); p.add_argument("--loss", default="mmd")
p.add_argument("--pca", type=int, default=32); p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_every", type=int, default=500); p.add_argument("--whiten", action="store_true")
p.add_argument("--drop", type=float, default=0.1); p.add_argument("--param", default="cayley"); p.add_argument("--beta", type=float, default=0.01); p.add_argument("--refine", type=int, default=0)
a = p.parse_args()
torch.manual_seed(a.seed)
xa, xb, ae, be = data(a.n)
m0 = xa.mean(0); _, s, v = torch.linalg.svd(xa - m0, full_matrices=False)
k = a.pca or xa.shape[1]; v = v[:k]
R = random_orthogonal(k, k, torch.Generator().manual_seed(12345), torch.float32)
xa, xb = (xa - m0) @ v.T, ((mini[a.n:2 * a.n] - m0) @ v.T) @ R.T
ae = (ae - m0) @ v.T; be = ae @ R.T
sc = xa.norm(dim=1).mean(); xa, xb = xa / sc, xb / sc  # unit-ish scale
G = torch.nn.Linear(k, k, bias=False)
if a.param in ("matrix_exp", "cayley", "householder"): G = orthogonal(G, orthogonal_map=a.param)
else:
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(G.weight); G.weight.copy_(u @ vh)
with torch.no_grad():
    pass
og = torch.optim.Adam(G.parameters(), lr=a.lr)
D = torch.nn.Sequential(torch.nn.Dropout(a.drop), torch.nn.Linear(k, a.hid), torch.nn.LeakyReLU(0.2),
                        torch.nn.Linear(a.hid, a.hid), torch.nn.LeakyReLU(0.2), torch.nn.Linear(a.hid, 1))
od = torch.optim.Adam(D.parameters(), lr=a.dlr, betas=(0.5, 0.999))
def mmd(x, y, bws=(0.25, 0.5, 1.0, 2.0)):
    xy = torch.cat([x, y]); d2 = torch.cdist(xy, xy).pow(2); n = len(x)
    K = sum(torch.exp(-d2 / (2 * b * b)) for b in bws)
    return K[:n, :n].mean() + K[n:, n:].mean() - 2 * K[:n, n:].mean()
t0 = time.time()
for it in range(a.iters):
    ia = torch.randint(len(xa), (a.bs,)); ib = torch.randint(len(xb), (a.bs,))
    if a.loss == "mmd":
        l = mmd(G(xa[ia]), xb[ib])
    else:
        for _ in range(a.dsteps):
            with torch.no_grad(): fake = G(xa[ia])
            ld = 0.5 * ((D(xb[ib]) - 0.9).pow(2).mean() + D(fake).pow(2).mean())
            od.zero_grad(); ld.backward(); od.step()
            ib = torch.randint(len(xb), (a.bs,))
        l = (D(G(xa[ia])) - 1).pow(2).mean()
    og.zero_grad(); l.backward(); og.step()
    if a.param == "muse":
        with torch.no_grad():
            w = G.weight
            for _ in range(2): w.copy_((1 + a.beta) * w - a.beta * w @ w.T @ w)
    if (it + 1) % a.eval_every == 0:
        with torch.no_grad():
            log(it + 1, f"{time.time()-t0:.0f}s loss {l.item():.4f}", met(G(ae / sc), be / sc),
                "|W-R|", round((G.weight - R).norm().item(), 2))

from dualenc.plugins.unpaired import csls_pairs
from dualenc.plugins.procrustes import procrustes_q
q = G.weight.detach().clone()
for r in range(a.refine):
    i, j = csls_pairs(xa @ q.T, xb)
    q = procrustes_q(xa[i].double(), xb[j].double(), use_scipy=False).float()
    log("refine", r, met(ae / sc @ q.T, be / sc))
