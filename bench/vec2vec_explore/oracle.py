from common import *
import sys
from dualenc.plugins.procrustes import procrustes_q
n, eps = int(sys.argv[1]), float(sys.argv[2])
xa, _, ae, be = data(n, eps)
ya = planted_target(xa, eps)  # paired (oracle only)
xa, ya, ae, be = (t.double() for t in (xa, ya, ae, be))
mx, my = xa.mean(0), ya.mean(0)
q = procrustes_q(xa - mx, ya - my, use_scipy=False)
print("oracle paired procrustes", met(F.normalize((ae - mx) @ q.T + my, dim=-1), be))
X = torch.cat([xa, torch.ones(n, 1, dtype=xa.dtype)], 1)
B = torch.linalg.lstsq(X, ya).solution
print("oracle paired lstsq", met(F.normalize(torch.cat([ae, torch.ones(len(ae), 1, dtype=ae.dtype)], 1) @ B, dim=-1), be))
