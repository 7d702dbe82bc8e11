"""CPU cores per 1,000 samples/s with and without GPU JPEG decode (``WebDataModule(gpu_decode=True)``).

Same shards and helpers as ``bench_data.py`` (web-sized JPEG q90 photos, alt-text captions, BERT
tokenizer at 64 tokens), training transform at ``--image-size``. In this process with one torch
thread (a loader worker's budget), the fastest of ``--repeats``:

- ``worker_path``: what a worker does today with the defaults (tar read, PIL decode with the safe
  draft, timm random resized crop + flip to uint8, collate + tokenize);
- ``byte_path``: what a worker does with ``gpu_decode`` (tar read, JPEG header, the same crop/flip
  draws, collate + tokenize; no pixel work);
- ``device_decode``: ``gpu_decode.decode_batch`` on ``--device`` (CUDA: nvJPEG batched decode +
  per-image crop/resize/flip on the GPU; images/s of the whole step, synchronized). On the CPU it
  is the host decode that the byte path moved out of the workers (a reference, not a GPU figure).

Cores per 1,000 samples/s = 1000 / per-worker rate; the JSON also says whether 16 cores feed
5,000 samples/s (ViT-B/32-class) either way.

    python bench/bench_gpu_decode.py                  # GPU machine: bench/results/gpu_decode_<gpu>.json
    python bench/bench_gpu_decode.py --device cpu     # here: the worker-side figures are meaningful
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import bench_data  # noqa: E402  (shards, data config, timings: one definition for both benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATE, CORES = 5000.0, 16


def tokenizer(context_length: int) -> Callable:
    if os.environ.get("DUALENC_BENCH_TOKENIZER"):  # bench/gpu_checks.sh carries only the tokenizer files
        from dualenc.towers.text import Tokenize, load_tokenizer

        return Tokenize(load_tokenizer(os.environ["DUALENC_BENCH_TOKENIZER"]), context_length)
    return bench_data.tokenizer_fn(context_length)


def worker_rate(raw: list[dict], decoder: Any, transform: Callable, collate: Callable, batch_size: int,
                repeats: int) -> dict[str, Any]:
    def once() -> dict[str, float]:
        t0, n, batch = time.perf_counter(), 0, []
        for sample in raw:
            s = decoder(dict(sample))
            if s is None:
                continue
            s["image"] = transform(s["image"])
            batch.append(s)
            if len(batch) == batch_size:
                collate(batch)
                n, batch = n + len(batch), []
        return {"samples_per_s": n / (time.perf_counter() - t0)}
    return bench_data.best_of(repeats, once, "samples_per_s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dualenc.data.datamodule import WebDataModule
    from dualenc.data.gpu_decode import byte_preprocessing, decode_batch
    from dualenc.data.sources import expand_urls
    from dualenc.data.tario import iter_samples
    from dualenc.data.transforms import Collate

    device = torch.device(args.device)
    threads = torch.get_num_threads()
    cfg = bench_data.data_config(args.image_size)
    tokenize = tokenizer(64)
    with tempfile.TemporaryDirectory(prefix="dualenc-gpudec-") as tmp:
        shards = bench_data.write_shards(tmp, args.samples, max(64, args.samples // 4), args.synthetic)
        dm = WebDataModule(train=tmp, batch_size=args.batch_size, num_workers=0)  # the defaults
        dm.set_preprocessing(cfg, tokenize)
        decoder, transform = dm.preprocessing(train=True)
        urls = expand_urls(tmp)
        raw = [s for u in urls for s in iter_samples(u, decoder.wanted, decoder.skipped)]
        bdec, params, bcollate = byte_preprocessing(cfg, dm.decoder_args, dm.aug, None, tokenize)

        torch.set_num_threads(1)  # a loader worker's budget
        try:
            worker = worker_rate(raw, decoder, transform, Collate(tokenize, decoder.skipped), args.batch_size,
                                 args.repeats)
            byte = worker_rate(raw, bdec, params, bcollate, args.batch_size, args.repeats)
        finally:
            torch.set_num_threads(threads)

        batches = []
        for start in range(0, len(raw) - args.batch_size + 1, args.batch_size):
            samples = [s for s in (bdec(dict(r)) for r in raw[start:start + args.batch_size]) if s is not None]
            batches.append(bcollate([dict(s, image=params(s["image"])) for s in samples]))

        def device_once() -> dict[str, float]:
            n = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for b in batches:
                n += decode_batch(b["jpeg"], b["crop"], params.size, params.interpolation, device,
                                  b["jpeg_is_jpeg"]).shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return {"images_per_s": n / (time.perf_counter() - t0)}

        device_once()  # warm-up (nvJPEG handles, kernels)
        dev = bench_data.best_of(args.repeats, device_once, "images_per_s")
        if device.type == "cuda":
            dev["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    def cores(rate: float) -> dict[str, Any]:
        return {"per_worker_samples_per_s": rate, "cores_per_1000_samples_per_s": 1000 / rate,
                f"cores_for_{int(TARGET_RATE)}_samples_per_s": TARGET_RATE / rate,
                f"{CORES}_cores_feed_{int(TARGET_RATE)}": CORES * rate >= TARGET_RATE}

    return {
        "benchmark": "gpu_decode",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else bench_data.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": __import__("torchvision").__version__},
        "settings": {"image_size": args.image_size, "batch_size": args.batch_size, "samples": args.samples,
                     "repeats": args.repeats, "tokens": 64, "worker_path": "WebDataModule defaults (uint8, safe draft)"},
        "shards": shards,
        "worker_path": {**worker, **cores(worker["samples_per_s"])},
        "byte_path": {**byte, **cores(byte["samples_per_s"])},
        "worker_cpu_saving": worker["samples_per_s"] and byte["samples_per_s"] / worker["samples_per_s"],
        "device_decode": dev,
        "note": "device_decode on CPU is the host decode the byte path moved out of the workers; on CUDA it "
                "is nvJPEG + crop/resize/flip on the GPU (it also costs GPU time in the training step)",
        "load_average": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic", action="store_true", help="synthetic images instead of scikit-image's photos")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    r = run(args)
    for name in ("worker_path", "byte_path"):
        x = r[name]
        print(f"{name:12s} {x['per_worker_samples_per_s']:8.1f} samples/s per worker = "
              f"{x['cores_per_1000_samples_per_s']:.2f} cores per 1,000 samples/s")
    print(f"device_decode on {r['device']}: {r['device_decode']['images_per_s']:.0f} images/s")
    slug = "cpu" if args.device == "cpu" else re.sub(r"[^a-z0-9]+", "-", r["device_name"].lower()).strip("-")
    out = args.out or RESULTS / f"gpu_decode_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(r, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
