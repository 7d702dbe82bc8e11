"""Throughput and peak memory of the exact chunked retrieval metrics (not a test).

    python bench/bench_retrieval.py                         # 100k images x 500k captions, 512-d, CPU
    python bench/bench_retrieval.py --device cuda --out bench/results/retrieval_cuda.json
    python bench/bench_retrieval.py --images 20000 --texts 100000 --extrapolate-to 100000 500000

Synthetic data: unit vectors; every image owns texts/images captions (5 for the defaults, as in
COCO), each a noisy copy of its image so that positives rank high as in real data. The cost is
proportional to images x texts, so a smaller run can be extrapolated (the JSON says so when it is).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualenc.eval.retrieval import (DEFAULT_IMAGE_CHUNK, DEFAULT_TEXT_CHUNK,  # noqa: E402
                                    metrics_from_ranks, retrieval_ranks)


NOISE = 5.0  # caption = image + noise this many times longer: positives score ~0.2, negatives ~N(0, 0.044)


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_data(n: int, m: int, dim: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Built in place, chunk by chunk, so generation does not set the memory peak.
    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.empty(n, dim, device=device).normal_(generator=g)
    img.div_(img.norm(dim=1, keepdim=True))
    owner = torch.arange(m, device=device) * n // m  # an image's captions are adjacent, as in caption files
    txt = torch.empty(m, dim, device=device)
    for c in range(0, m, 65536):
        part = txt[c : c + 65536]
        part.normal_(generator=g).mul_(NOISE / dim**0.5)
        part.add_(img[owner[c : c + 65536]])
        part.div_(part.norm(dim=1, keepdim=True))
    return img, txt, owner


def run(n: int, m: int, dim: int, device: str, image_chunk: int, text_chunk: int, topk: int) -> dict:
    img, txt, owner = make_data(n, m, dim, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before, peak_before = rss_mib(), peak_rss_mib()
    t0 = time.perf_counter()
    ranks = retrieval_ranks(img, txt, owner, topk=topk, image_chunk=image_chunk, text_chunk=text_chunk, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    metrics = metrics_from_ranks(ranks)
    out = {
        "images": n, "texts": m, "dim": dim, "topk": topk, "image_chunk": image_chunk, "text_chunk": text_chunk,
        "seconds": round(seconds, 2),
        "pairs_per_second": round(n * m / seconds),
        "queries_per_second": round((n + m) / seconds, 1),
        "embeddings_mib": round((n + m) * dim * 4 / 2**20, 1),
        "rss_before_scan_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "scan_extra_peak_rss_mib": round(max(0.0, peak_rss_mib() - max(rss_before, peak_before)), 1)
        if peak_rss_mib() > peak_before else "below the data-generation peak",
        "metrics_sanity": {k: round(v, 4) for k, v in metrics.items() if "@1" in k or "median" in k},
    }
    if device == "cuda":
        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--texts", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-chunk", type=int, default=DEFAULT_IMAGE_CHUNK)
    p.add_argument("--text-chunk", type=int, default=DEFAULT_TEXT_CHUNK)
    p.add_argument("--topk", type=int, default=0, help="also keep top-k lists (0: ranks only)")
    p.add_argument("--extrapolate-to", type=int, nargs=2, metavar=("IMAGES", "TEXTS"),
                   help="label the run as a measurement scaled up to this size (cost ~ images x texts)")
    p.add_argument("--out", help="JSON file (default: bench/results/retrieval_<device>.json)")
    a = p.parse_args()
    result = {
        "benchmark": "dualenc.eval.retrieval.retrieval_ranks (exact ranks, both directions)",
        "device": a.device if a.device != "cuda" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "measured": run(a.images, a.texts, a.dim, a.device, a.image_chunk, a.text_chunk, a.topk),
    }
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["synthetic_data"] = (f"unit vectors; {a.texts // a.images} adjacent captions per image, each its image + "
                                f"noise {NOISE}x as long (positives ~0.2 cosine, negatives ~N(0, 0.044))")
    if a.extrapolate_to:
        n, m = a.extrapolate_to
        factor = n * m / (a.images * a.texts)
        result["extrapolated"] = {
            "note": f"NOT MEASURED: {n} x {m} estimated from the measured {a.images} x {a.texts} run, time scaled "
                    f"by {factor:g} (cost ~ images x texts); memory: block buffers are the same, embeddings and "
                    "per-query state grow linearly",
            "images": n, "texts": m,
            "seconds": round(result["measured"]["seconds"] * factor, 1),
            "embeddings_mib": round((n + m) * a.dim * 4 / 2**20, 1),
            # Measured peak, with the embeddings and ~40 bytes of per-query state scaled to the full size.
            "peak_rss_mib_estimate": round(result["measured"]["peak_rss_mib"]
                                           + ((n + m) - (a.images + a.texts)) * (a.dim * 4 + 40) / 2**20, 1),
        }
    out = Path(a.out or Path(__file__).parent / "results" / f"retrieval_{'cuda' if a.device == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
