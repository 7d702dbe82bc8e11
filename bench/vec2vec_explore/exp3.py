# vec2vec from an unpaired robust-MNN start: does training refine (mean cos up) or drift?
import argparse, warnings
from common import *
from dualenc.plugins.translate import (Vec2Vec, Vec2VecConfig, discriminator, _gan_g, _gan_d, _cos_loss, _vsp,
                                       unsupervised_score)
from dualenc.plugins.unpaired import fit_mnn_procrustes, csls_pairs
p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=4096); p.add_argument("--eps", type=float, default=0.2)
p.add_argument("--steps", type=int, default=300); p.add_argument("--bs", type=int, default=256)
p.add_argument("--lr", type=float, default=1e-4); p.add_argument("--dlr", type=float, default=1e-4)
p.add_argument("--hid", type=int, default=256); p.add_argument("--w", default="adv=1,lat=1,rec=1,cyc=10,vsp=1,pair=0")
p.add_argument("--eval_every", type=int, default=50); p.add_argument("--repair", type=int, default=100)
p.add_argument("--neval", type=int, default=4096); p.add_argument("--dwarm", type=int, default=0); p.add_argument("--dsteps", type=int, default=1)
a = p.parse_args()
w = {k: float(v) for k, v in (kv.split("=") for kv in a.w.split(","))}
xa, xb, ae, be = data(a.n, a.eps, a.neval)
t0 = time.time()
cache = f"/tmp/mnn_{a.n}_{a.eps}.pt"
if os.path.exists(cache):
    q, ma, mb = torch.load(cache, weights_only=True)
else:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fit_mnn_procrustes(xa.double(), xb.double(), robust=True)
    q, ma, mb = m.q.float(), m.means["image_source"].float(), m.means["image_target"].float()
    torch.save((q, ma, mb), cache)
log("mnn", f"{time.time()-t0:.0f}s", met(F.normalize((ae - ma) @ q.T + mb, dim=-1), be))
torch.manual_seed(0)
cfg = Vec2VecConfig(384, 384, 384, a.hid)
net = Vec2Vec(cfg); net.init_from_map(q, ma, mb)
da, db, dl = discriminator(384, a.hid), discriminator(384, a.hid), discriminator(384, a.hid)
og = torch.optim.Adam(net.parameters(), lr=a.lr, betas=(0.5, 0.999))
od = torch.optim.Adam([*da.parameters(), *db.parameters(), *dl.parameters()], lr=a.dlr, betas=(0.5, 0.999))
def ev(step):
    net.eval()
    with torch.no_grad():
        r = met(net.translate(ae, "a", "b"), be)
        s = unsupervised_score(lambda x: net.translate(x, "a", "b"), lambda y: net.translate(y, "b", "a"), xa, xb, n=1024)
    net.train()
    log(step, f"{time.time()-t0:.0f}s", r, {k: round(v, 4) for k, v in s.items()})
pi = pj = None
ev(0)
def dstep():
    ia = torch.randint(len(xa), (a.bs,)); ib = torch.randint(len(xb), (a.bs,))
    ba, bb = xa[ia], xb[ib]
    with torch.no_grad():
        za, zb = net.latent(ba, "a"), net.latent(bb, "b"); ab, ba_ = net.decode(za, "b"), net.decode(zb, "a")
    dloss = _gan_d(db, bb, ab) + _gan_d(da, ba, ba_) + _gan_d(dl, za, zb)
    od.zero_grad(); dloss.backward(); od.step()
    return dloss.item()
for i in range(a.dwarm):
    dl_ = dstep()
log("dwarm", a.dwarm, "dloss", locals().get("dl_"))
for step in range(1, a.steps + 1):
    if w["pair"] and (pi is None or step % a.repair == 1):
        with torch.no_grad():
            net.eval(); ta = net.translate(xa, "a", "b"); net.train()
        pi, pj = csls_pairs(ta, xb)
    ia = torch.randint(len(xa), (a.bs,)); ib = torch.randint(len(xb), (a.bs,))
    ba, bb = xa[ia], xb[ib]
    za, zb = net.latent(ba, "a"), net.latent(bb, "b")
    ab, ba_ = net.decode(za, "b"), net.decode(zb, "a")
    t = {"adv": _gan_g(db, ab) + _gan_g(da, ba_), "lat": _gan_g(dl, za) + dl(zb).pow(2).mean(),
         "rec": _cos_loss(net.decode(za, "a"), ba) + _cos_loss(net.decode(zb, "b"), bb),
         "cyc": _cos_loss(net.translate(ab, "b", "a"), ba) + _cos_loss(net.translate(ba_, "a", "b"), bb),
         "vsp": _vsp(ab, ba) + _vsp(ba_, bb)}
    if w["pair"]:
        k = torch.randint(len(pi), (a.bs,), )
        xi, yj = xa[pi[k]], xb[pj[k]]
        t["pair"] = _cos_loss(net.translate(xi, "a", "b"), yj) + _cos_loss(net.translate(yj, "b", "a"), xi)
    loss = sum(w[k] * v for k, v in t.items() if w[k])
    og.zero_grad(); loss.backward(); og.step()
    if w["adv"] or w["lat"]:
        for _ in range(a.dsteps): dstep()
    if step % a.eval_every == 0:
        ev(step)
