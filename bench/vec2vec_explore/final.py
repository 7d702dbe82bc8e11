from common import *
import sys
from dualenc.plugins.unpaired import csls_pairs, mutual_nn
from dualenc.plugins.procrustes import procrustes_q
n, eps = int(sys.argv[1]), float(sys.argv[2])
xa, xb, ae, be = data(n, eps)
q, ma, mb = torch.load(f"/tmp/mnn_{n}_{eps}.pt", weights_only=True)
q, ma, mb, xa, xb, ae, be = (t.double() for t in (q, ma, mb, xa, xb, ae, be))
xc, yc = xa - ma, xb - mb
ev = lambda qq: met(F.normalize((ae - ma) @ qq.T + mb, dim=-1), be)
print("start", ev(q))
i, j = csls_pairs(xc @ q.T, yc); n2 = len(i) // 2
mut = set(zip(i[:n2].tolist(), j[:n2].tolist())) & set(zip(i[n2:].tolist(), j[n2:].tolist()))
mi, mj = map(torch.tensor, zip(*mut)); print("csls mutual", len(mi), ev(procrustes_q(xc[mi], yc[mj], use_scipy=False)))
mi, mj = mutual_nn(xc @ q.T, yc); print("cos mutual", len(mi), ev(procrustes_q(xc[mi], yc[mj], use_scipy=False)))
# soft: weighted by softmax over similarities (entropic)
for t in (0.01, 0.02, 0.05, 0.1, 0.2):
    qq = q
    for r in range(3):
        s = F.normalize(xc @ qq.T, dim=-1) @ F.normalize(yc, dim=-1).T
        pw = torch.softmax(s / t, 1) + torch.softmax(s / t, 0)
        u, _, vh = torch.linalg.svd(yc.T @ pw.T @ xc); qq = u @ vh
    print("soft", t, ev(qq))
X = torch.cat([xa, torch.ones(n, 1, dtype=xa.dtype)], 1); Xe = torch.cat([ae, torch.ones(len(ae), 1, dtype=ae.dtype)], 1)
for t in (0.02, 0.05):
    s = F.normalize(xc @ q.T, dim=-1) @ F.normalize(yc, dim=-1).T
    bary = torch.softmax(s / t, 1) @ xb
    for lam in (1e-3, 1e-1):
        B = torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ bary)
        print("bary lstsq", t, lam, met(F.normalize(Xe @ B, dim=-1), be))
