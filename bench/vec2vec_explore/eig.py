from common import *
import sys
n, eps = int(sys.argv[1]), float(sys.argv[2])
xa, xb, ae, be = data(n, eps)
q, ma, mb = torch.load(f"/tmp/mnn_{n}_{eps}.pt", weights_only=True)
q, ma, mb, xa, xb, ae, be = (t.double() for t in (q, ma, mb, xa, xb, ae, be))
xc, yc = xa - ma, xb - mb
ex, vx = torch.linalg.eigh(xc.T @ xc / n); ey, vy = torch.linalg.eigh(yc.T @ yc / n)
P = vy.T @ q @ vx
d = P.diagonal()
print("|diag P| quantiles", torch.quantile(d.abs(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=d.dtype)))
print("linear start", met(F.normalize((ae - ma) @ q.T + mb, dim=-1), be))
qp = vy @ torch.diag(torch.sign(d)) @ vx.T
print("pca signed by Q", met(F.normalize((ae - ma) @ qp.T + mb, dim=-1), be))
# banded: keep P entries within eigen-index distance b, re-orthogonalize
for b in (0, 2, 5, 10, 20, 50):
    idx = torch.arange(P.shape[0]); mask = (idx[:, None] - idx[None, :]).abs() <= b
    u, _, vh = torch.linalg.svd(P * mask); qb = vy @ (u @ vh) @ vx.T
    print("band", b, met(F.normalize((ae - ma) @ qb.T + mb, dim=-1), be))
