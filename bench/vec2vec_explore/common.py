"""Exploratory scripts behind docs/alignment.md's vec2vec tables (interactive runs, one thread each; not a
benchmark harness: results are in the docs only). Data: RT_CACHE/minilm.npy (bench/real_text_data.py).

    RT_CACHE=C python bench/vec2vec_explore/orth.py --loss gan --pca 32 --lr 0.05 --seed 1   # random start
    RT_CACHE=C python bench/vec2vec_explore/muse.py --iters 2000                              # MUSE-style
    RT_CACHE=C python bench/vec2vec_explore/exp3.py --n 6144 --eps 0.1 --lr 1e-4 --dlr 1e-4   # drift from a start
    RT_CACHE=C python bench/vec2vec_explore/final.py 6144 0.1                                 # soft Procrustes
(exp3.py caches its robust MNN start in /tmp; moment.py, eig.py and final.py reuse it.)
orth.py plants R with seed 12345: with seed 0 its R correlated with the generator's seed-0 start
(trace(W^T R) = -71 of 384), which made the first runs look like successes.
"""
import time, torch, numpy as np, os, sys, json
import torch.nn.functional as F
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from study_real_text import planted_target
from dualenc.plugins.crossmodel import translation_metrics
mini = torch.from_numpy(np.load(os.path.join(os.environ.get("RT_CACHE", "/tmp/rt"), "minilm.npy"))).float()
def data(n=4096, eps=0.0, neval=4096):
    xa, xb = mini[:n], planted_target(mini[n:2 * n], eps)
    ae = mini[-neval:]
    return xa, xb, ae, planted_target(ae, eps)
def met(pred, true):
    r = translation_metrics(pred.float(), true.float())
    return {k: round(v, 4) for k, v in r.items() if k != "candidates"}
def log(*a):
    print(time.strftime("%H:%M:%S"), *a, os.getloadavg()[0], flush=True)
