"""This machine's own bf16 matmul ceiling: the denominator for an MFU that the chip can actually reach.

Datasheet peaks (989 TFLOP/s bf16 dense for the H100 SXM and H200) are not reached by any real
kernel; on random data an H100/H200 sustains about 790 TFLOP/s (clocks drop under the power draw of
random bits). This times plain ``torch.matmul`` (cuBLAS) on square and transformer-shaped bf16
problems with CUDA events, after a warm-up, and reports the best shape's rate as ``ceiling_flops``;
``bench_train_step.py`` reads it to give an MFU against it beside the MFU against 989 TFLOP/s.

    python bench/bench_matmul.py                          # GPU -> bench/results/matmul_ceiling_<gpu>.json
    python bench/bench_matmul.py --device cpu --sizes 256 --iters 3 --out /tmp/m.json   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DATASHEET_BF16 = 989e12  # H100 SXM / H200 bf16 dense tensor-core peak, FLOP/s


def shapes(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(m, k, n): squares, and for each size a BERT/ViT-base MLP-like (tokens x 768 -> 3072) problem."""
    out = [(s, s, s) for s in sizes]
    out += [(max(sizes) * 2, 768, 3072), (max(sizes) * 2, 3072, 768)]
    return out


def time_matmul(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, iters: int) -> dict[str, Any]:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    for _ in range(max(2, iters // 5)):  # warm-up: cuBLAS heuristics, clocks up
        torch.matmul(a, b, out=out)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - t0
    flops = 2.0 * m * k * n * iters
    return {"m": m, "k": k, "n": n, "iters": iters, "seconds": seconds, "flops_per_s": flops / seconds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = [time_matmul(m, k, n, device, dtype, args.iters) for m, k, n in shapes(args.sizes)]
    best = max(rows, key=lambda r: r["flops_per_s"])
    return {
        "benchmark": "matmul_ceiling",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)},
        "dtype": args.dtype,
        "shapes": rows,
        "ceiling_flops": best["flops_per_s"],
        "ceiling_shape": [best["m"], best["k"], best["n"]],
        "fraction_of_datasheet_989": best["flops_per_s"] / DATASHEET_BF16,
        "load_average": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    for r in result["shapes"]:
        print(f"  {r['m']:6d} x {r['k']:5d} x {r['n']:5d}: {r['flops_per_s'] / 1e12:8.1f} TFLOP/s")
    print(f"ceiling on {result['device_name']}: {result['ceiling_flops'] / 1e12:.1f} TFLOP/s "
          f"({100 * result['fraction_of_datasheet_989']:.1f}% of 989)")
    out = args.out or RESULTS / f"matmul_ceiling_{slug(torch.device(args.device))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
