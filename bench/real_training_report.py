"""Table and curves of the real-training study (bench/real_training.py) for docs/real_training.md.

    python bench/real_training_report.py --json bench/results/real_training_cpu.json \\
        --runs runs/real_bench --plot docs/real_training.png

Prints the markdown table (mean ± sample std over seeds); with ``--runs``, reads each run's training
loss from the trainers' own logs (dualenc's metrics.csv, open_clip's out.log) into
``<json stem>_curves.json`` and plots them beside the accuracies.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Any

ROWS = [("chance", "chance"), ("untrained", "untrained (random projections)"),
        ("frozen_features", "frozen pretrained features (no projection)"),
        ("lit", "**dualenc** LiT, cached towers"), ("lit_nocache", "**dualenc** LiT, no cache"),
        ("lit_augment", "**dualenc** LiT, random crops + flips (image cache off)"),
        ("open_clip_lit", "**open_clip** LiT (`--lock-image`)"),
        ("open_clip_lit_freeze_bn", "open_clip LiT with `--lock-image-freeze-bn-stats` (drops BN's activation)"),
        ("open_clip_lit_timm_bn", "open_clip LiT, BN frozen by timm's function (patched)"), ("finetune", "**dualenc** full fine-tuning"),
        ("open_clip_finetune", "**open_clip** full fine-tuning")]
COLS = [("zeroshot_all.top1", "zero-shot all (10)"), ("zeroshot_seen.top1", "seen (7)"),
        ("zeroshot_unseen.top1", "unseen (3)"), ("probe.top1", "linear probe"), ("knn.top1@1", "kNN R@1"),
        ("samples_per_s", "samples/s"), ("wall_s", "fit wall s")]


def cell(summary: dict[str, Any], row: str, key: str) -> str:
    if row == "chance":
        return {"zeroshot_all.top1": "0.100", "zeroshot_seen.top1": "0.143", "zeroshot_unseen.top1": "0.333",
                "probe.top1": "0.100", "knn.top1@1": "0.100"}.get(key, "")
    v = summary.get(row, {}).get(key)
    if v is None:
        return ""
    digits = 0 if key in ("samples_per_s", "wall_s") and v["mean"] >= 10 else (1 if key == "samples_per_s" else 3)
    spread = f" ± {v['std']:.{digits}f}" if v["n"] > 1 else ""
    return f"{v['mean']:.{digits}f}{spread}" + (f" (n={v['n']})" if v["n"] not in (1, 3) else "")


def table(result: dict[str, Any]) -> str:
    summary = result["summary"]
    lines = ["| run | " + " | ".join(c for _, c in COLS) + " |", "|---" * (len(COLS) + 1) + "|"]
    for row, label in ROWS:
        if row == "chance" or row in summary:
            lines.append(f"| {label} | " + " | ".join(cell(summary, row, k) for k, _ in COLS) + " |")
    return "\n".join(lines)


def dualenc_curve(root: Path) -> list[tuple[int, float]]:
    out = []
    for r in csv.DictReader(open(max(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime))):
        if r.get("train/loss"):
            out.append((int(r["step"]), float(r["train/loss"])))
    return out


def open_clip_curve(root: Path, batch: int, steps_per_epoch: int) -> list[tuple[int, float]]:
    out = []
    pat = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+.*?Contrastive_loss: ([0-9.]+)")
    for m in pat.finditer((root / "out.log").read_text()):
        out.append((int(m[1]) * steps_per_epoch + int(m[2]) // batch - 1, float(m[3])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench/results/real_training_cpu.json")
    p.add_argument("--runs", default=None, help="the study's --out folder, to read the loss curves")
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    result = json.loads(Path(a.json).read_text())
    print(table(result))
    curves_path = Path(a.json).with_name(Path(a.json).stem + "_curves.json")
    if a.runs:
        batch = result["settings"]["batch"]
        steps = result["samples"] // batch
        curves: dict[str, list] = {}
        for d in sorted(Path(a.runs).iterdir()):
            if not d.is_dir() or d.name.startswith(("init", "scratch", "feature")):
                continue
            if d.name.startswith("open_clip") and (d / "out.log").is_file():
                curves[d.name] = open_clip_curve(d, batch, steps)
            elif any(d.rglob("metrics.csv")):
                curves[d.name] = dualenc_curve(d)
        curves_path.write_text(json.dumps(curves))
    if a.plot and curves_path.is_file():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        curves = json.loads(curves_path.read_text())
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
        for name, pts in curves.items():
            if not pts:
                continue
            style = "-" if not name.startswith("open_clip") else "--"
            color = "C0" if name.startswith("lit") else "C1" if name.startswith("open_clip_lit") else "C2"
            ax.plot(*zip(*pts), style, color=color, alpha=0.8, label=name)
        ax.set_xlabel("step (batch %d)" % result["settings"]["batch"])
        ax.set_ylabel("training loss (each trainer's own log)")
        ax.set_title("Fashion-MNIST alt-text, Lite0 + MiniLM: dualenc (solid) vs open_clip (dashed)")
        ax.legend(fontsize=7)
        summary = result["summary"]
        rows = [r for r, _ in ROWS if r in summary and r != "frozen_features"]
        keys = [k for k, _ in COLS[:5]]
        width = 0.8 / max(1, len(rows))
        for i, row in enumerate(rows):
            means = [summary[row].get(k, {}).get("mean", 0) for k in keys]
            stds = [summary[row].get(k, {}).get("std", 0) for k in keys]
            bx.bar([j + i * width for j in range(len(keys))], means, width, yerr=stds, label=row, capsize=2)
        bx.plot([j + 0.4 - width / 2 for j in range(3)], [0.1, 1 / 7, 1 / 3], "k_", markersize=20, label="chance")
        bx.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [c for _, c in COLS[:5]], fontsize=8)
        bx.set_ylim(0, 1)
        bx.set_title("test top-1 (mean ± std over seeds)")
        bx.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
