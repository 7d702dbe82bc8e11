"""The upgrade table on real (trained demo) embeddings: re-embed vs map through Q vs stay on OLD (not a test).

    python bench/bench_index_recall.py --work /tmp/index_recall        # ~30 min on 2 shared cores

Trains two demo models (`configs/demo.yaml`, different seeds: OLD and NEW), embeds the demo's val
images (the index) and val captions (held-out queries) with both through `dualenc embed`, fits the
NEW -> OLD Procrustes map on 3000 *train* images through `dualenc align embed/fit` (so the queries are
held out of the fit), and runs `dualenc index eval` on an exact (Flat) and a compressed index.
Writes bench/results/index_recall_demo.json. Each step is skipped when its output exists (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(args: list[str], cwd: Path, done: Path | None = None) -> None:
    if done is not None and done.exists():
        return
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=cwd, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/index_recall")
    p.add_argument("--steps", type=int, default=30, help="training steps per model (batch 128); more is better, "
                   "30 is what a shared 2-core machine trained in ~10 min")
    p.add_argument("--seeds", type=int, nargs=2, default=[1, 2], metavar=("OLD", "NEW"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "index_recall_demo.json"))
    a = p.parse_args()
    w = Path(a.work)
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dualenc, data = str(BIN / "dualenc"), "data/demo"
    sh([str(BIN / "dualenc-data"), "demo", "--out", data], w, w / data / "val")
    sh([str(BIN / "dualenc-data"), "tokenizer", "--shards", f"{data}/train", "--out", f"{data}/tokenizer"], w,
       w / data / "tokenizer")
    for side, seed in zip(("old", "new"), a.seeds):
        sh([dualenc, "fit", "--config", str(REPO / "configs" / "demo.yaml"), f"--seed_everything={seed}",
            f"--trainer.max_steps={a.steps}", f"--trainer.default_root_dir=runs/{side}",
            "--trainer.enable_progress_bar=false"], w, w / "runs" / side / "export" / "config.json")
        export = f"runs/{side}/export"
        sh([dualenc, "embed", "--model", export, "--images", f"{data}/val", "--out", f"emb/{side}/img"], w,
           w / "emb" / side / "img" / "manifest.json")
        sh([dualenc, "embed", "--model", export, "--texts", f"{data}/val", "--out", f"emb/{side}/txt"], w,
           w / "emb" / side / "txt" / "manifest.json")
        sh([dualenc, "align", "embed", "--target", "dualenc", "--target-args", json.dumps({"path": export}),
            "--shards", f"{data}/train/shard-{{00000..00001}}.tar", "--cpu", "--out", f"{side}_train.safetensors"], w,
           w / f"{side}_train.safetensors")
    sh([dualenc, "align", "fit", "--method", "procrustes", "--source", "new_train.safetensors", "--target",
        "old_train.safetensors", "--out", "new2old.safetensors"], w, w / "new2old.safetensors")
    report = w / "index_eval.json"
    sh([dualenc, "index", "eval", "--old-images", "emb/old/img", "--new-images", "emb/new/img",
        "--old-queries", "emb/old/txt", "--new-queries", "emb/new/txt", "--map", "new2old.safetensors",
        "--factory", "Flat", "--factory", "auto", "--json", str(report)], w)
    result = {"benchmark": "dualenc index eval on two trained demo models (text -> image, held-out val captions)",
              "setup": {"demo": "dualenc-data demo defaults (12000 train / 1000 val)", "train_steps": a.steps,
                        "seeds_old_new": a.seeds, "map": "procrustes fitted on 3000 train images and their captions "
                        "(2 of the 8 train shards)"},
              "load_average": [round(x, 2) for x in os.getloadavg()], "wall_seconds": round(time.time() - t0),
              "report": json.loads(report.read_text())}
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result["report"]["indexes"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
