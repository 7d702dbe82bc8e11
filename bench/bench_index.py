"""FAISS index build and search at 10M x 512-d on this machine, streamed from disk (not a test).

    # the 10M run (docs/performance.md): 23 min to write the 20 GB, the build > 1 h on 2 shared cores
    python bench/bench_index.py --count 10000000 --queries 500 --nlist 1024 --pq 32 --train-size 32768
    python bench/bench_index.py --count 1000000 --queries 500 --nlist 1024 --pq 32 --train-size 32768 \
        --phases generate build search --out bench/results/index_1m_cpu.json                  # ~8 min
    python bench/bench_index.py --phases flat --flat-images 10000 --flat-texts 500000  # exact scorers vs sgemm

Phases (each writes the JSON as it finishes, so a long run leaves figures behind even if stopped):
  generate  synthetic unit embeddings written by dualenc's EmbeddingWriter in shards (float32 npy; never
            all in RAM): clustered (a random centre + low-rank + isotropic noise), and ``--queries`` queries
            that are noisy copies of known rows (the planted neighbours).
  exact     streaming brute force over the shards: exact top-10 ground truth and the exact scan's speed.
  build     ``dualenc.index.build.build_index`` (the ``dualenc index build`` code) with an IVF-PQ factory.
  search    queries/s and recall@10 against the exact top-10, and the planted neighbour's hit rate, per nprobe.
  flat      ``dualenc retrieval``'s exact scorer vs FAISS IndexFlatIP vs the measured sgemm ceiling, on the
            same in-memory embeddings (bench/bench_retrieval.py's synthetic captions).

Peak RSS is measured per phase (VmHWM, reset between phases). Timings are noisy when other jobs share the
machine: the load average is recorded at each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualenc.eval.store import EmbeddingWriter  # noqa: E402
from dualenc.index.build import build_index  # noqa: E402
from dualenc.index.store import iter_chunks, open_index  # noqa: E402

SHARD = 100_000
CLUSTERS, RANK = 4096, 64
SPREAD, ISO, QUERY_NOISE = 0.6, 0.4, 0.05  # low-rank spread, isotropic noise, query perturbation (norms)


# ---- memory ----------------------------------------------------------------------------------------
def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:  # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    return round(_status("VmHWM"), 1)


def du_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


# ---- synthetic data ----------------------------------------------------------------------------------
def structure(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng([seed, 0])
    centres = g.standard_normal((CLUSTERS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(g.standard_normal((dim, RANK)))[0].T.astype(np.float32)  # (RANK, dim) orthonormal
    return centres, basis


def make_shard(i: int, n: int, dim: int, seed: int, centres: np.ndarray, basis: np.ndarray) -> np.ndarray:
    g = np.random.default_rng([seed, 1, i])
    x = centres[g.integers(0, CLUSTERS, n)]
    x += (g.standard_normal((n, RANK), dtype=np.float32) * (SPREAD / RANK**0.5)) @ basis
    x += g.standard_normal((n, dim), dtype=np.float32) * (ISO / dim**0.5)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def phase_generate(a: argparse.Namespace, emb: Path) -> dict[str, Any]:
    centres, basis = structure(a.dim, a.seed)
    writer = EmbeddingWriter(emb, "image", "synthetic", f"bench_index seed {a.seed}", params={"shard": SHARD},
                             overwrite=True)
    g = np.random.default_rng([a.seed, 2])
    planted = np.sort(g.choice(a.count, a.queries, replace=False))
    queries = np.empty((a.queries, a.dim), dtype=np.float32)
    for i, start in enumerate(range(0, a.count, SHARD)):
        n = min(SHARD, a.count - start)
        x = make_shard(i, n, a.dim, a.seed, centres, basis)
        lo, hi = np.searchsorted(planted, [start, start + n])
        queries[lo:hi] = x[planted[lo:hi] - start]
        writer.write(f"emb-{i:05d}", x, [f"s{start + j:09d}" for j in range(n)])
        del x
    writer.finish()
    queries += g.standard_normal(queries.shape, dtype=np.float32) * (QUERY_NOISE / a.dim**0.5)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(emb.parent / "queries.npy", queries)
    np.save(emb.parent / "planted.npy", planted)
    return {"embeddings_dir_mib": du_mib(emb)}


class ExactTopK:
    """Exact top-k of the queries over every chunk it is shown (a streaming brute force)."""

    def __init__(self, queries: np.ndarray, k: int = 10) -> None:
        self.q, self.k, self.start, self.seconds = torch.from_numpy(queries), k, 0, 0.0
        self.best_s = torch.full((len(queries), k), -float("inf"))
        self.best_i = torch.zeros((len(queries), k), dtype=torch.long)

    def __call__(self, vec: np.ndarray) -> None:
        t = time.perf_counter()
        s = self.q @ torch.from_numpy(vec).T
        top_s, top_i = s.topk(min(self.k, s.shape[1]), dim=1)
        cat_s, cat_i = torch.cat([self.best_s, top_s], 1), torch.cat([self.best_i, top_i + self.start], 1)
        self.best_s, pos = cat_s.topk(self.k, dim=1)
        self.best_i = cat_i.gather(1, pos)
        self.start += len(vec)
        self.seconds += time.perf_counter() - t

    def report(self, emb: Path) -> dict[str, Any]:
        np.save(emb.parent / "exact_top10.npy", self.best_i.numpy())
        planted = np.load(emb.parent / "planted.npy")
        top = self.best_i.numpy()
        return {"queries": len(top), "scan_seconds": round(self.seconds, 1),
                "queries_per_second": round(len(top) / self.seconds, 2) if self.seconds else None,
                "planted_recall@1": float((top[:, 0] == planted).mean()),
                "planted_recall@10": float((top == planted[:, None]).any(1).mean())}


def phase_exact(a: argparse.Namespace, emb: Path) -> dict[str, Any]:
    """A pass of its own over the shards (``--phases exact``); the build phase does the same in its pass."""
    exact = ExactTopK(np.load(emb.parent / "queries.npy"))
    for _, vec in iter_chunks(emb, 65536):
        exact(vec)
    return exact.report(emb)


def phase_build(a: argparse.Namespace, emb: Path) -> dict[str, Any]:
    out = emb.parent / "index"
    # Exact top-10 of the queries in the same pass over the 20 GB (a second pass costs as much again).
    exact = None if (emb.parent / "exact_top10.npy").is_file() else ExactTopK(np.load(emb.parent / "queries.npy"))
    meta = build_index(emb, out, factory=a.factory, normalize=False, train_size=a.train_size, overwrite=True,
                       log=lambda s: None, on_chunk=exact)
    if exact is not None:
        a.exact_in_build = exact.report(emb)
    return {**({"exact_ground_truth_in_same_pass": a.exact_in_build} if exact is not None else {}),"factory": meta.factory, "train_size": meta.train_size, "index_dir_mib": du_mib(out),
            "index_file_mib": round((out / "index.faiss").stat().st_size / 2**20, 1),
            "bytes_per_vector": round((out / "index.faiss").stat().st_size / a.count, 2),
            "build_seconds_inside": meta.extra["build_seconds"]}


def phase_search(a: argparse.Namespace, emb: Path) -> dict[str, Any]:
    import faiss

    index, meta, keys = open_index(emb.parent / "index")
    q = np.load(emb.parent / "queries.npy")
    exact = np.load(emb.parent / "exact_top10.npy")
    planted = np.load(emb.parent / "planted.npy")
    ps = faiss.ParameterSpace()
    rows = []
    for nprobe in a.nprobe:
        ps.set_index_parameters(index, f"nprobe={nprobe}")
        index.search(q[:10], 10)  # warm-up
        t = time.perf_counter()
        _, got = index.search(q, 10)
        sec = time.perf_counter() - t
        inter = [len(np.intersect1d(g, e)) for g, e in zip(got, exact)]
        rows.append({"nprobe": nprobe, "queries_per_second": round(len(q) / sec, 1),
                     "recall@10_vs_exact": round(float(np.mean(inter)) / 10, 4),
                     "exact_top1_found@10": round(float((got == exact[:, :1]).any(1).mean()), 4),
                     "planted_recall@1": round(float((got[:, 0] == planted).mean()), 4),
                     "planted_recall@10": round(float((got == planted[:, None]).any(1).mean()), 4)})
    t = time.perf_counter()
    found = keys.get(got[:100, 0])
    lookup_us = (time.perf_counter() - t) / 100 * 1e6
    assert all(k == f"s{i:09d}" for k, i in zip(found, got[:100, 0]))
    return {"index_rss_mib": round(_status("VmRSS"), 1), "key_lookup_us": round(lookup_us, 1), "by_nprobe": rows}


def sgemm_gflops(seconds: float = 5.0, shape: tuple[int, int, int] = (2048, 512, 8192)) -> float:
    """Best float32 matmul rate (torch -> the BLAS dualenc and FAISS both call) over ``seconds``."""
    m, k, n = shape
    x, y, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    torch.mm(x, y, out=out)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(x, y, out=out)
        best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return round(best, 1)


def phase_flat(a: argparse.Namespace, emb: Path) -> dict[str, Any]:
    import faiss

    from bench_retrieval import make_data
    from dualenc.eval.retrieval import retrieval_ranks

    n, m, d = a.flat_images, a.flat_texts, a.dim
    img, txt, owner = make_data(n, m, d, "cpu")
    pass_gflop = 2 * n * m * d / 1e9  # one image x text score matrix
    ceiling_before = sgemm_gflops()
    out: dict[str, Any] = {"images": n, "texts": m, "dim": d, "one_pass_gflop": round(pass_gflop, 1),
                           "sgemm_gflops_before": ceiling_before}

    def timed(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    # dualenc: exact ranks of both directions from one pass over the blocks (and optional top-10 lists).
    s_ranks = timed(lambda: retrieval_ranks(img, txt, owner))
    s_ranks_topk = timed(lambda: retrieval_ranks(img, txt, owner, topk=10))
    # FAISS: exact top-10 of each direction is its own pass (an index per side).
    xi, xt = img.numpy(), txt.numpy()
    it, ii = faiss.IndexFlatIP(d), faiss.IndexFlatIP(d)
    it.add(xt)
    ii.add(xi)
    s_f_i2t = timed(lambda: it.search(xi, 10))
    s_f_t2i = timed(lambda: ii.search(xt, 10))
    # Plain matmul of the same size, blocked like dualenc's scan: what any exact scorer can approach.
    def mm_pass() -> None:
        o = torch.empty(8192, 8192)
        for a0 in range(0, n, 8192):
            for b0 in range(0, m, 8192):
                x, y = img[a0:a0 + 8192], txt[b0:b0 + 8192]
                torch.mm(x, y.T, out=o[: len(x), : len(y)])
    s_mm = timed(mm_pass)
    ceiling = max(ceiling_before, sgemm_gflops())
    out["sgemm_gflops_peak"] = ceiling

    def row(sec: float, passes: int) -> dict[str, float]:
        g = passes * pass_gflop / sec
        return {"seconds": round(sec, 2), "pairs_per_second": round(n * m * passes / sec),
                "effective_gflops": round(g, 1), "fraction_of_sgemm_peak": round(g / ceiling, 3)}

    out["dualenc_exact_ranks_both_directions"] = row(s_ranks, 1)
    out["dualenc_exact_ranks_plus_top10_both_directions"] = row(s_ranks_topk, 1)
    out["faiss_flatip_top10_image_to_text"] = row(s_f_i2t, 1)
    out["faiss_flatip_top10_text_to_image"] = row(s_f_t2i, 1)
    out["faiss_flatip_top10_both_directions"] = row(s_f_i2t + s_f_t2i, 2)
    out["blocked_torch_mm_one_pass"] = row(s_mm, 1)
    out["note"] = ("dualenc scores each block once for both directions (ranks exact, near-ties rechecked in "
                   "float64); FAISS needs one search per direction. effective_gflops counts 2*N*M*D flops per "
                   "direction-pass; pairs_per_second counts image-text pairs scored per pass.")
    return out


PHASES = {"generate": phase_generate, "exact": phase_exact, "build": phase_build, "search": phase_search,
          "flat": phase_flat}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--pq", type=int, default=64, help="PQ bytes per vector")
    p.add_argument("--factory", help="default: IVF{nlist}_HNSW32,PQ{pq}np (an HNSW coarse quantizer makes adding "
                   "10M vectors affordable on 2 cores)")
    p.add_argument("--train-size", type=int, default=65536)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--flat-images", type=int, default=10_000)
    p.add_argument("--flat-texts", type=int, default=500_000)
    p.add_argument("--phases", nargs="+", default=["generate", "build", "search"],
                   choices=list(PHASES))
    p.add_argument("--scratch", default="/tmp/bench_index", help="embeddings and index go here (~21 GB at 10M)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_cpu.json"))
    a = p.parse_args()
    a.factory = a.factory or f"IVF{a.nlist}_HNSW32,PQ{a.pq}np"  # np: no polysemous training (minutes, unused)
    torch.set_num_threads(os.cpu_count() or 1)
    emb = Path(a.scratch) / "emb"
    emb.parent.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    result: dict[str, Any] = {
        "benchmark": "dualenc index build/search (FAISS) streamed from a dualenc embed directory",
        "config": {**{k: v for k, v in vars(a).items() if k not in ("out", "scratch")},
                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "synthetic_data": (f"unit vectors: one of {CLUSTERS} random centres + rank-{RANK} noise (norm {SPREAD}) + "
                           f"isotropic noise (norm {ISO}), normalized; queries = planted rows + noise (norm "
                           f"{QUERY_NOISE}), normalized"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "phases": {},
    }
    try:
        import faiss

        result["versions"]["faiss"] = faiss.__version__
        result["machine"]["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    if out.is_file():  # phases run separately accumulate in one file
        old = json.loads(out.read_text())
        if old.get("config", {}).get("count") == a.count:
            result["phases"] = old.get("phases", {})
    try:
        for name in a.phases:
            reset_peak()
            load = [round(x, 2) for x in os.getloadavg()]
            t = time.perf_counter()
            res = PHASES[name](a, emb)
            res = {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mib": peak_mib(),
                   "load_average_before": load, "load_average_after": [round(x, 2) for x in os.getloadavg()], **res}
            result["phases"][name] = res
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, out)
            print(name, json.dumps(res), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(a.scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
