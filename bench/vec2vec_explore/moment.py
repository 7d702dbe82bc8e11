from common import *
import sys
from dualenc.plugins.unpaired import csls_pairs
from dualenc.plugins.procrustes import procrustes_q
n, eps = int(sys.argv[1]), float(sys.argv[2])
xa, xb, ae, be = data(n, eps)
q, ma, mb = torch.load(f"/tmp/mnn_{n}_{eps}.pt", weights_only=True)
q, ma, mb, xa, xb, ae, be = (t.double() for t in (q, ma, mb, xa, xb, ae, be))
def sqrtm(c, p, shrink=1e-6):
    e, v = torch.linalg.eigh(c); e = e.clamp_min(shrink * e.max()); return (v * e.pow(p)) @ v.T
xc, yc = xa - ma, xb - mb
cx, cy = xc.T @ xc / n, yc.T @ yc / n
print("linear start", met(F.normalize((ae - ma) @ q.T + mb, dim=-1), be))
for shrink in (1e-6, 1e-4, 1e-3, 1e-2):
    wx, cxh, wy, cyh = sqrtm(cx, -0.5, shrink), sqrtm(cx, 0.5, shrink), sqrtm(cy, -0.5, shrink), sqrtm(cy, 0.5, shrink)
    u, _, vh = torch.linalg.svd(wy @ q @ cxh); o = u @ vh
    M = cyh @ o @ wx
    print("moment", shrink, met(F.normalize((ae - ma) @ M.T + mb, dim=-1), be))
    for r in range(3):
        i, j = csls_pairs((xc @ wx) @ o.T, yc @ wy)
        o = procrustes_q((xc @ wx)[i], (yc @ wy)[j], use_scipy=False)
        M = cyh @ o @ wx
        print("  refine whitened", r, met(F.normalize((ae - ma) @ M.T + mb, dim=-1), be))
