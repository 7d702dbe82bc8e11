# MUSE-style adversarial: linear W kept orthogonal, D with input dropout, smoothing, SGD.
import argparse
from common import *
p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=4096); p.add_argument("--iters", type=int, default=20000)
p.add_argument("--bs", type=int, default=32); p.add_argument("--dsteps", type=int, default=5)
p.add_argument("--lr", type=float, default=0.1); p.add_argument("--hid", type=int, default=512)
p.add_argument("--center", action="store_true"); p.add_argument("--beta", type=float, default=0.001)
p.add_argument("--pca", type=int, default=0); p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_every", type=int, default=2000); p.add_argument("--refine", type=int, default=5)
a = p.parse_args()
torch.manual_seed(a.seed)
xa, xb, ae, be = data(a.n)
if a.pca:
    from dualenc.plugins.synthetic import random_orthogonal
    m0 = xa.mean(0); _, _, v = torch.linalg.svd(xa - m0, full_matrices=False); v = v[:a.pca]
    R = random_orthogonal(a.pca, a.pca, torch.Generator().manual_seed(0), torch.float32)
    xa, xb = (xa - m0) @ v.T, ((mini[a.n:2 * a.n] - m0) @ v.T) @ R.T
    ae = (ae - m0) @ v.T; be = ae @ R.T
if a.center:
    ma, mb = xa.mean(0), xb.mean(0); xa, xb = xa - ma, xb - mb
d = xa.shape[1]
W = torch.eye(d)
D = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(d, a.hid), torch.nn.LeakyReLU(0.2),
                        torch.nn.Linear(a.hid, a.hid), torch.nn.LeakyReLU(0.2), torch.nn.Linear(a.hid, 1))
Wp = torch.nn.Parameter(W.clone())
og = torch.optim.SGD([Wp], lr=a.lr); od = torch.optim.SGD(D.parameters(), lr=a.lr)
sm = 0.1
def evalW():
    with torch.no_grad():
        if a.center:
            pred = (ae - ma) @ Wp.T + mb
        else:
            pred = ae @ Wp.T
        return met(pred, be)
t0 = time.time()
for it in range(a.iters):
    for _ in range(a.dsteps):
        ia = torch.randint(len(xa), (a.bs,)); ib = torch.randint(len(xb), (a.bs,))
        with torch.no_grad():
            fake = xa[ia] @ Wp.T
        x = torch.cat([fake, xb[ib]]); y = torch.cat([torch.full((a.bs,), sm), torch.full((a.bs,), 1 - sm)])
        D.train(); l = F.binary_cross_entropy_with_logits(D(x).squeeze(1), y)
        od.zero_grad(); l.backward(); od.step()
    ia = torch.randint(len(xa), (a.bs,))
    D.eval()
    fake = xa[ia] @ Wp.T
    lg = F.binary_cross_entropy_with_logits(D(fake).squeeze(1), torch.full((a.bs,), 1 - sm))
    og.zero_grad(); lg.backward(); og.step()
    with torch.no_grad():
        Wp.copy_((1 + a.beta) * Wp - a.beta * Wp @ Wp.T @ Wp)
    if (it + 1) % a.eval_every == 0:
        log(it + 1, f"{time.time()-t0:.0f}s", "dloss", round(l.item(), 3), evalW())
# self-learning refinement: CSLS pairs + Procrustes from W
from dualenc.plugins.unpaired import csls_pairs
from dualenc.plugins.procrustes import procrustes_q
ma2, mb2 = xa.mean(0), xb.mean(0)
q = Wp.detach().clone()
for r in range(a.refine):
    i, j = csls_pairs((xa - ma2) @ q.T, xb - mb2)
    q = procrustes_q((xa - ma2)[i].double(), (xb - mb2)[j].double(), use_scipy=False).float()
    if a.center: pred = (ae - ma) @ q.T + mb
    else: pred = (ae - ma2) @ q.T + mb2
    log("refine", r, met(pred, be))
