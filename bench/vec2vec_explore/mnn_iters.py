from common import *
import warnings, sys
from dualenc.plugins.unpaired import fit_mnn_procrustes
eps, n, iters = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
xa, xb, ae, be = data(n, eps)
t0 = time.time()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    m = fit_mnn_procrustes(xa.double(), xb.double(), robust=True, iters=iters)
log(eps, n, iters, f"{time.time()-t0:.0f}s", m.meta.extra["iterations"], met(m.apply(ae.double()), be.double()))
