"""The GPU tables of docs/performance.md from the JSON files of one `bash bench/gpu_checks.sh all` run.

    tar xzf gpu_results.tar.gz                       # in the repo root: bench/results/*.json + gpu_logs/
    python bench/gpu_results_to_docs.py              # print the tables
    python bench/gpu_results_to_docs.py --write      # replace the block between the gpu-results markers

Reads every CUDA result in bench/results (train_step_*, matmul_ceiling_*, retrieval_cuda.json,
gpu_decode_*) and gpu_logs/phases.jsonl (which phases ran, timed out or were skipped), and checks
the issue's goals on each row: dualenc / open_clip >= 1.3 eager and >= 1.05 compiled on the
EfficientNet-B0 and ViT-B/16 + BERT-base configs, MFU >= 35% on ViT-B/16 + BERT-base, peak memory
<= open_clip's.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
GOAL_CONFIGS = ("effnet_b0-bert", "vit_b16-bert")


def load(results: Path) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {"train_step": [], "ceiling": [], "retrieval": [], "decode": []}
    for path in sorted(results.glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        r["_file"] = path.name
        kind = r.get("benchmark", "")
        gpu = str(r.get("device", "")).startswith("cuda") or path.name == "retrieval_cuda.json"
        if not gpu:
            continue
        if kind == "train_step":
            found["train_step"].append(r)
        elif kind == "matmul_ceiling":
            found["ceiling"].append(r)
        elif kind == "gpu_decode":
            found["decode"].append(r)
        elif path.name.startswith("retrieval_"):
            found["retrieval"].append(r)
    return found


def lever(r: dict[str, Any]) -> str:
    s = r["settings"]
    parts = []
    if s.get("compile_step"):
        parts.append("whole step compiled" + (f" ({s['compile_mode']})" if s.get("compile_mode") else "")
                     + " vs open_clip whole model compiled")
    elif s.get("compile"):
        parts.append("towers compiled (both)")
    if s.get("fused_loss"):
        parts.append("fused loss")
    if s.get("foreach"):
        parts.append("foreach AdamW")
    if s.get("grad_checkpointing"):
        parts.append("grad checkpointing")
    if s.get("grad_cache_chunks"):
        parts.append(f"grad cache {s['grad_cache_chunks']}")
    return ", ".join(parts) or "eager"


def goals(r: dict[str, Any]) -> str:
    s, ratio = r["settings"], r["ratio_dualenc_over_open_clip"]["samples_per_s"]
    out = []
    if r["config"] in GOAL_CONFIGS and not (s.get("fused_loss") or s.get("foreach")):
        compiled = s.get("compile") or s.get("compile_step")
        need = 1.05 if compiled else 1.3
        out.append(f"x{ratio:.2f} {'>=' if ratio >= need else '<'} {need} {'met' if ratio >= need else 'NOT met'}")
    if r["config"] == "vit_b16-bert" and "mfu" in r["dualenc"]:
        mfu = r["dualenc"]["mfu"]
        out.append(f"MFU {100 * mfu:.1f}% {'met' if mfu >= 0.35 else 'NOT met'} (>= 35%)")
    mem = r["ratio_dualenc_over_open_clip"].get("peak_mem_alone_est")
    if mem is not None:
        out.append(f"memory x{mem:.2f} {'met' if mem <= 1.0 else 'NOT met'} (<= 1)")
    return "; ".join(out)


def pct(x: dict[str, Any], key: str) -> str:
    return f"{100 * x[key]:.1f}%" if key in x else "-"


def train_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| config | lever | device | dualenc samples/s | open_clip samples/s | dualenc / open_clip (median; paired) "
             "| GFLOP/step | MFU vs 989 dualenc / open_clip | MFU vs measured ceiling dualenc / open_clip "
             "| peak memory MiB dualenc / open_clip (alone, est.) | goals | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"effnet_b0-bert": 0, "vit_b16-bert": 1, "vit_b32": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["config"], 9), lever(r) != "eager", lever(r))):
        de, oc, ratio = r["dualenc"], r["open_clip"], r["ratio_dualenc_over_open_clip"]
        v = r["versions"]
        mem = (f"{de['peak_mem_alone_est_mb']:,.0f} / {oc['peak_mem_alone_est_mb']:,.0f}"
               if "peak_mem_alone_est_mb" in de else "-")
        lines.append(
            f"| `{r['config']}` (batch {r['settings']['batch_size']}) | {lever(r)} | {r['device_name']}, torch "
            f"{v['torch']} | {de['samples_per_s']:,.0f} | {oc['samples_per_s']:,.0f} | "
            f"{ratio['samples_per_s']:.2f}; {ratio['samples_per_s_median_paired_windows']:.2f} | "
            f"{de['flops_per_step'] / 1e9:,.0f} | {pct(de, 'mfu')} / {pct(oc, 'mfu')} | "
            f"{pct(de, 'mfu_vs_measured_ceiling')} / {pct(oc, 'mfu_vs_measured_ceiling')} | {mem} | {goals(r)} | "
            f"`{r['_file']}` |")
    return lines


def render(found: dict[str, list[dict[str, Any]]], phases: list[dict[str, Any]]) -> str:
    out = []
    for c in found["ceiling"]:
        out.append(f"Measured bf16 matmul ceiling on {c['device_name']} (torch {c['versions']['torch']}): "
                   f"**{c['ceiling_flops'] / 1e12:.0f} TFLOP/s** ({100 * c['fraction_of_datasheet_989']:.0f}% of "
                   f"989; shape {' x '.join(map(str, c['ceiling_shape']))}, `{c['_file']}`).\n")
    if found["train_step"]:
        out += train_table(found["train_step"]) + [""]
    for r in found["retrieval"]:
        m = r["measured"]
        out.append(f"Retrieval on CUDA ({r['device']}): {m.get('images')} images x {m.get('texts')} captions in "
                   f"{m.get('seconds')} s (`{r['_file']}`).\n")
    for d in found["decode"]:
        w, b, dev = d["worker_path"], d["byte_path"], d["device_decode"]
        out.append(f"GPU JPEG decode ({d['device_name']}, {d['settings']['image_size']} px): CPU cores per 1,000 "
                   f"samples/s {w['cores_per_1000_samples_per_s']:.2f} (worker decode) vs "
                   f"{b['cores_per_1000_samples_per_s']:.2f} (gpu_decode: bytes only); device decode + augment "
                   f"{dev['images_per_s']:,.0f} images/s (`{d['_file']}`).\n")
    if phases:
        out.append("Phases of the run: " + ", ".join(f"{p['phase']} {p['status']}"
                                                     + (f" ({p['seconds']} s)" if "seconds" in p else "")
                                                     for p in phases) + ".\n")
    return "\n".join(out).strip() + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--write", action="store_true", help=f"replace the block between {BEGIN} and {END} in {DOCS}")
    p.add_argument("--docs", type=Path, default=DOCS)
    a = p.parse_args(argv)
    found = load(a.results)
    phases_file = a.results / "gpu_logs" / "phases.jsonl"
    phases = [json.loads(line) for line in phases_file.read_text().splitlines() if line.strip()] \
        if phases_file.is_file() else []
    if not any(found.values()):
        raise SystemExit(f"no GPU results in {a.results}: untar gpu_results.tar.gz from bench/gpu_checks.sh first")
    block = render(found, phases)
    print(block)
    if a.write:
        text = a.docs.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{a.docs} has no {BEGIN} ... {END} block to replace")
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{block}{END}", text, flags=re.S)
        tmp = a.docs.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(a.docs)
        print(f"updated {a.docs}")


if __name__ == "__main__":
    main()
