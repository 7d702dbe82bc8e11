"""bench/gpu_results_to_docs.py turns one GPU run's JSONs into docs/performance.md's GPU block."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_results_to_docs", REPO / "bench" / "gpu_results_to_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _planted_run(results: Path) -> None:
    """A train-step result as bench_train_step.py writes it on CUDA (the CPU file with GPU figures)."""
    r = json.loads((REPO / "bench" / "results" / "train_step_tiny-cpu_cpu.json").read_text())
    r.update(config="vit_b16-bert", device="cuda:0", device_name="NVIDIA H200")
    r["settings"].update(batch_size=256, compile_step=True, compile_mode=None, fused_loss=False, foreach=False)
    r["dualenc"].update(samples_per_s=2600.0, mfu=0.37, mfu_vs_measured_ceiling=0.46, peak_mem_alone_est_mb=30000.0)
    r["open_clip"].update(samples_per_s=2400.0, mfu=0.34, mfu_vs_measured_ceiling=0.43, peak_mem_alone_est_mb=31000.0)
    r["ratio_dualenc_over_open_clip"].update(samples_per_s=2600 / 2400, samples_per_s_median_paired_windows=1.07,
                                             peak_mem_alone_est=30 / 31)
    (results / "train_step_vit_b16-bert_nvidia-h200_cstep.json").write_text(json.dumps(r))
    (results / "matmul_ceiling_nvidia-h200.json").write_text(json.dumps({
        "benchmark": "matmul_ceiling", "device": "cuda", "device_name": "NVIDIA H200", "versions": {"torch": "2.11.0"},
        "ceiling_flops": 790e12, "ceiling_shape": [8192, 8192, 8192], "fraction_of_datasheet_989": 790 / 989}))
    shutil.copy(REPO / "bench" / "results" / "train_step_tiny-cpu_cpu.json", results)  # CPU: not a GPU row
    (results / "gpu_logs").mkdir()
    (results / "gpu_logs" / "phases.jsonl").write_text(
        '{"phase": "ceiling", "status": "ok", "rc": 0, "seconds": 9}\n{"phase": "tests", "status": "skipped: budget"}\n')


def test_gpu_table_from_a_run_and_the_docs_block(tmp_path: Path) -> None:
    mod = _script()
    results = tmp_path / "results"
    results.mkdir()
    _planted_run(results)
    docs = tmp_path / "performance.md"
    docs.write_text(f"# Perf\n\nbefore\n{mod.BEGIN}\nnot yet measured\n{mod.END}\nafter\n")
    mod.main(["--results", str(results), "--write", "--docs", str(docs)])
    text = docs.read_text()
    assert "not yet measured" not in text and text.startswith("# Perf\n\nbefore\n") and text.endswith("after\n")
    assert "**790 TFLOP/s**" in text
    row = next(line for line in text.splitlines() if line.startswith("| `vit_b16-bert`"))
    assert "whole step compiled vs open_clip whole model compiled" in row and "| 2,600 | 2,400 |" in row
    assert "x1.08 >= 1.05 met" in row and "MFU 37.0% met" in row and "46.0% / 43.0%" in row
    assert "tiny-cpu" not in text  # CPU results are not GPU rows
    assert "tests skipped: budget" in text


def test_the_shipped_docs_have_the_block() -> None:
    mod = _script()
    text = (REPO / "docs" / "performance.md").read_text()
    assert text.count(mod.BEGIN) == 1 and text.count(mod.END) == 1
