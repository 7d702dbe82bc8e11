"""Real towers on real images, dualenc beside open_clip's own trainer (issue: train real towers).

For each seed, one initial model (ImageNet EfficientNet-Lite0 + MiniLM from their packages, projections
drawn with the seed) is written twice, as a dualenc export and as an open_clip ``local-dir`` model.
``dualenc fit`` and ``open_clip_train.main`` then train it on the same shards with the same steps,
batch, optimizer, schedule, locking and seed, and ``bench/real_eval.py`` scores both trained models
with the same code. Throughput is each trainer's own samples/s over its logging windows (startup
excluded), median over windows, both on this machine in the same process tree, one after the other.

    python bench/real_training.py --out runs/real_bench --seeds 0 1 2 \\
        --json bench/results/real_training_cpu.json

Rows: ``lit`` (image tower locked, dualenc's feature cache on), ``lit_nocache`` (the same run computing
the locked tower every step: the like-for-like speed comparison with open_clip, which has no cache),
``open_clip_lit``; with ``--finetune``, ``finetune`` and ``open_clip_finetune`` (both towers train).
Baselines: chance, the untrained model (random projections) and the frozen tower's own features.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
CONFIG = REPO / "configs" / "real" / "lit_lite0_minilm.yaml"
FINETUNE = REPO / "configs" / "real" / "finetune_lite0_minilm.yaml"


def shard_spec(train: Path) -> tuple[str, int]:
    """A brace pattern over the shards of ``train`` (its ``sizes.json``) and their sample total."""
    sizes = json.loads((train / "sizes.json").read_text())
    names = sorted(sizes)
    return f"{train}/{{{Path(names[0]).stem}..{Path(names[-1]).stem}}}.tar", sum(sizes.values())


def settings(a: argparse.Namespace) -> dict[str, Any]:
    """What both trainers are given (dualenc overrides; open_clip flags are derived from the same values)."""
    return dict(epochs=a.epochs, batch=a.batch, lr=a.lr, wd=0.1, warmup=a.warmup, context=a.context,
                unlocked_text_layers=a.unlocked_text_layers, workers=a.workers, clip=1.0)


def dualenc_args(s: dict[str, Any]) -> list[str]:
    return ["--trainer.max_epochs", str(s["epochs"]), "--data.batch_size", str(s["batch"]),
            "--model.optimizer.lr", str(s["lr"]), "--model.optimizer.weight_decay", str(s["wd"]),
            "--model.scheduler.warmup_steps", str(s["warmup"]), "--trainer.gradient_clip_val", str(s["clip"]),
            "--model.model.text_tower.init_args.context_length", str(s["context"]),
            "--model.lock_text", "null" if s["unlocked_text_layers"] is None else str(s["unlocked_text_layers"]),
            "--data.num_workers", str(s["workers"]),
            "--data.eval_sets", "null", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "7"]


def make_init(config: Path, seed: int, out: Path, s: dict[str, Any]) -> tuple[Path, Path]:
    """The seed's initial model as a dualenc export and an open_clip local-dir model (the same weights)."""
    from dualenc.cli import make_cli
    from dualenc.export import export_model
    from dualenc.interop.open_clip import export_open_clip

    de, oc = out / f"init_{seed}" / "dualenc", out / f"init_{seed}" / "open_clip"
    if not (oc / "open_clip_config.json").is_file():
        argv = (["--config", str(config), "--seed_everything", str(seed), *dualenc_args(s),
                                   "--trainer.logger", "false", "--trainer.default_root_dir", str(out / "scratch")])
        model = make_cli(argv, run=False).model.model
        export_model(model, de)
        export_open_clip(model, oc)
    return de, oc


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def fit_dualenc(config: Path, seed: int, init: Path, root: Path, s: dict[str, Any], cache: Path | None,
                extra: list[str]) -> dict[str, Any]:
    cmd = [str(REPO / ".venv/bin/dualenc"), "fit", "--config", str(config), "--seed_everything", str(seed),
           "--model.model.init_from", str(init), "--trainer.default_root_dir", str(root), *dualenc_args(s),
           "--model.image_feature_cache", str(cache) if cache else "null",
           "--model.text_feature_cache", str(cache) if cache and s["unlocked_text_layers"] == 0 else "null", *extra]
    shutil.rmtree(root, ignore_errors=True)  # a rerun's logs must not be read from an earlier run's folder
    wall = run(cmd, root.with_suffix(".log"))
    rates = [float(r["train/samples_per_sec"]) for r in csv.DictReader(open(next(root.rglob("metrics.csv"))))
             if r.get("train/samples_per_sec")]
    return {"wall_s": wall, "samples_per_s": statistics.median(rates[1:] or rates), "windows": len(rates),
            "model": str(root / "export")}


def fit_open_clip(seed: int, init: Path, root: Path, s: dict[str, Any], shards: str, samples: int,
                  finetune: bool, freeze_bn: bool = False, timm_freeze: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "bench" / "open_clip_train_run.py"), "--model", f"local-dir:{init}",
           "--train-data", shards, "--dataset-type", "webdataset", "--train-num-samples", str(samples),
           "--batch-size", str(s["batch"]), "--epochs", str(s["epochs"]), "--lr", str(s["lr"]),
           "--wd", str(s["wd"]), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
           "--warmup", str(s["warmup"]), "--lr-scheduler", "cosine", "--grad-clip-norm", str(s["clip"]),
           "--precision", "fp32", "--device", "cpu", "--workers", str(s["workers"]), "--seed", str(seed),
           "--logs", str(root.parent), "--name", root.name,
           "--save-frequency", str(s["epochs"]), "--log-every-n-steps", "7", "--report-to", ""]
    # open_clip's only training transform is a random resized crop: scale 1.0 makes it (nearly) the whole
    # image, as dualenc's augment: false; fine-tuning gives both the same crop range and no flip.
    # Not --lock-image-freeze-bn-stats: open_clip 3.3's own freeze_batch_norm_2d turns timm's BatchNormAct2d into
    # a plain FrozenBatchNorm2d, dropping the activation (EfficientNet's ReLU6): the locked tower's features change
    # (max |diff| 0.26 after normalization) and training collapses to chance (row open_clip_lit_freeze_bn). Its
    # default keeps the weights locked and batch norm in train mode (batch statistics, running stats updated).
    cmd += ["--aug-cfg", "scale=(0.8, 1.0)"] if finetune else ["--lock-image", "--aug-cfg", "scale=(1.0, 1.0)"]
    if freeze_bn:
        cmd += ["--lock-image-freeze-bn-stats"]
    if s["unlocked_text_layers"] is not None:
        # open_clip 3.3's partial unlock has no layer list for BERT (KeyError 'layer_attr'): only full locks.
        if s["unlocked_text_layers"]:
            raise SystemExit("open_clip cannot unlock the last layers of a BERT-family text tower; use "
                             "--unlocked-text-layers 0 (locked) or leave it unset (trained)")
        cmd += ["--lock-text", "--lock-text-freeze-layer-norm"]
    shutil.rmtree(root, ignore_errors=True)  # open_clip refuses an existing experiment folder
    wall = run(cmd, root.with_suffix(".log"), env={"OPEN_CLIP_TIMM_BN_FREEZE": "1" if timm_freeze else "0"})
    text = (root / "out.log").read_text()
    batch_t = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    rates = [s["batch"] / t for t in batch_t]
    ckpt = root / "checkpoints" / f"epoch_{s['epochs']}.pt"
    return {"wall_s": wall, "samples_per_s": statistics.median(rates[1:] or rates), "windows": len(rates),
            "checkpoint": str(ckpt)}


def load_trained(init_dualenc: Path, weights: str) -> Any:
    """The dualenc architecture of the run, holding the weights a trainer produced."""
    from dualenc.export import load_model
    from dualenc.interop.pretrained import load_pretrained

    model = load_model(init_dualenc)
    if weights.endswith(".pt"):
        load_pretrained(model, weights)
    return model


def summarize(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and spread (sample std) over seeds of every number of each row."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = float(v)
        return out

    table = {}
    for name, runs in rows.items():
        flats = [flat(r) for r in runs]
        keys = sorted(set().union(*flats)) if flats else []
        table[name] = {k: {"mean": statistics.fmean(f[k] for f in flats if k in f),
                           "std": statistics.stdev([f[k] for f in flats if k in f]) if len(flats) > 1 else 0.0,
                           "n": sum(k in f for f in flats)} for k in keys}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/fmnist", help="a `dualenc-data real` output (train/ and eval/)")
    p.add_argument("--out", default="runs/real_bench")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="LiT: only the projections and temperature learn")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--unlocked-text-layers", type=int, default=0,
                   help="LiT rows: the text tower's last N layers train (0: locked, as configs/real; -1: all train)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", default="baselines,lit,lit_nocache,open_clip_lit",
                   help="comma list of: baselines, lit, lit_nocache, lit_augment, open_clip_lit, "
                        "open_clip_lit_freeze_bn, open_clip_lit_timm_bn, finetune, open_clip_finetune")
    p.add_argument("--nocache-seeds", type=int, default=3, help="seeds for lit_nocache and lit_augment")
    p.add_argument("--json", default="bench/results/real_training_cpu.json")
    a = p.parse_args()
    from real_eval import PooledFeatures, evaluate_model

    out, data = (REPO / a.out).resolve(), (REPO / a.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.unlocked_text_layers < 0:
        a.unlocked_text_layers = None
    s = settings(a)
    s_ft = dict(s, lr=a.finetune_lr, unlocked_text_layers=None)  # both towers train
    shards, samples = shard_spec(data / "train")
    rows_wanted = a.rows.split(",")
    result_path = REPO / a.json
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    runs: dict[str, list[dict[str, Any]]] = {k: v for k, v in result.get("runs", {}).items()}
    ev = data / "eval"

    def record(name: str, entry: dict[str, Any]) -> None:
        runs.setdefault(name, [])
        runs[name] = [r for r in runs[name] if r.get("seed") != entry.get("seed")] + [entry]
        result.update(runs=runs, summary=summarize(runs), settings=s, finetune_settings=s_ft, data=str(a.data), samples=samples,
                      command=" ".join(sys.argv), torch=torch.__version__, threads=torch.get_num_threads(),
                      machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU")
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1))
        print(name, json.dumps(entry), flush=True)

    def want(row: str, seed: int) -> bool:  # rows already in the JSON are kept (rerun with another --json)
        return row in rows_wanted and not any(r.get("seed") == seed for r in runs.get(row, []))

    for seed in a.seeds:
        de, oc = make_init(CONFIG, seed, out, s)
        if "baselines" in rows_wanted and seed == a.seeds[0]:
            init = load_trained(de, "")
            if not runs.get("untrained"):
                record("untrained", {"seed": seed, **evaluate_model(init, ev)})
            if not runs.get("frozen_features"):
                record("frozen_features", {"seed": seed, **evaluate_model(PooledFeatures(init), ev, zeroshot=False)})
        if want("lit", seed):
            r = fit_dualenc(CONFIG, seed, de, out / f"lit_{seed}", s, out / "feature_cache", [])
            record("lit", {"seed": seed, **r, **evaluate_model(load_trained(Path(r["model"]), ""), ev)})
        if want("lit_nocache", seed) and seed in a.seeds[: a.nocache_seeds]:
            r = fit_dualenc(CONFIG, seed, de, out / f"lit_nocache_{seed}", s, None, [])
            record("lit_nocache", {"seed": seed, **r, **evaluate_model(load_trained(Path(r["model"]), ""), ev)})
        if want("lit_augment", seed) and seed in a.seeds[: a.nocache_seeds]:
            # The cache's trade-off: random crops make every view new, so the image tower runs every step.
            r = fit_dualenc(CONFIG, seed, de, out / f"lit_augment_{seed}", s, out / "feature_cache",
                            ["--data.augment", "true", "--data.crop_scale", "[0.8, 1.0]", "--data.hflip", "0.5",
                             "--model.image_feature_cache", "null"])
            record("lit_augment", {"seed": seed, **r, **evaluate_model(load_trained(Path(r["model"]), ""), ev)})
        if want("open_clip_lit", seed):
            r = fit_open_clip(seed, oc, out / f"open_clip_lit_{seed}", s, shards, samples, finetune=False)
            record("open_clip_lit", {"seed": seed, **r, **evaluate_model(load_trained(de, r["checkpoint"]), ev)})
        if want("open_clip_lit_freeze_bn", seed):
            r = fit_open_clip(seed, oc, out / f"open_clip_lit_freeze_bn_{seed}", s, shards, samples, finetune=False,
                              freeze_bn=True)
            record("open_clip_lit_freeze_bn", {"seed": seed, **r,
                                               **evaluate_model(load_trained(de, r["checkpoint"]), ev)})
        if want("open_clip_lit_timm_bn", seed):  # open_clip's loop with its BN freezing fixed: the loop alone
            r = fit_open_clip(seed, oc, out / f"open_clip_lit_timm_bn_{seed}", s, shards, samples, finetune=False,
                              freeze_bn=True, timm_freeze=True)
            record("open_clip_lit_timm_bn", {"seed": seed, **r,
                                             **evaluate_model(load_trained(de, r["checkpoint"]), ev)})
        if want("finetune", seed):
            r = fit_dualenc(FINETUNE, seed, de, out / f"finetune_{seed}", s_ft, None, ["--data.hflip", "0"])
            record("finetune", {"seed": seed, **r, **evaluate_model(load_trained(Path(r["model"]), ""), ev)})
        if want("open_clip_finetune", seed):
            r = fit_open_clip(seed, oc, out / f"open_clip_finetune_{seed}", s_ft, shards, samples, finetune=True)
            record("open_clip_finetune", {"seed": seed, **r,
                                          **evaluate_model(load_trained(de, r["checkpoint"]), ev)})


if __name__ == "__main__":
    main()
