"""GPU smoke tests: bf16 + compiled towers, FSDP and DeepSpeed ZeRO-1/2/3 through `dualenc fit`.

They need CUDA (Lightning runs FSDP and DeepSpeed on GPUs only) and are skipped elsewhere; on the
GPU machine `bash bench/gpu_checks.sh` runs them together with the benchmarks. Each trains the tiny
config for 4 steps on one GPU and checks the checkpoint's step and that the export holds the full
trained weights (under ZeRO-3 and FSDP the parameters live sharded, so this tests the gather).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run bench/gpu_checks.sh on a GPU)")


def _fit(tmp_path: Path, demo_data: Path, *extra: str) -> subprocess.CompletedProcess:
    cfg = tiny_config(tmp_path, demo_data, max_steps=4)
    cmd = [sys.executable, "-m", "dualenc.cli", "fit", "--config", str(cfg),
           "--trainer.accelerator", "cuda", "--trainer.devices", "1", "--data.num_workers", "1", *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _check_export(tmp_path: Path) -> None:
    from dualenc.export import load_model

    model = load_model(tmp_path / "run" / "export")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Trained, not the initial weights: the logit scale moves from log(1/0.07) in 4 AdamW steps.
    assert abs(float(model.logit_scale.detach()) - float(torch.log(torch.tensor(1 / 0.07)))) > 1e-4


def test_bf16_compiled_towers_cuda(tmp_path: Path, demo_data: Path) -> None:
    _fit(tmp_path, demo_data, "--trainer.precision", "bf16-mixed", "--model.compile_towers", "true")
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    _check_export(tmp_path)


def test_fsdp_cuda(tmp_path: Path, demo_data: Path) -> None:
    _fit(tmp_path, demo_data, "--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"),
         "--trainer.precision", "bf16-mixed")
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    _check_export(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs `pip install dualenc[deepspeed]`")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_cuda(tmp_path: Path, demo_data: Path, stage: int) -> None:
    _fit(tmp_path, demo_data, "--config", str(REPO / "configs" / "strategy" / "deepspeed.yaml"),
         "--trainer.strategy.init_args.stage", str(stage), "--trainer.precision", "bf16-mixed",
         "--trainer.sync_batchnorm", "false")
    assert (tmp_path / "ckpt" / "last.ckpt").exists()  # a directory of ZeRO shards under DeepSpeed
    _check_export(tmp_path)


def test_compiled_step_cuda_graphs_cuda(tmp_path: Path, demo_data: Path) -> None:
    """The levers of the GPU run together: the whole step compiled with CUDA graphs, the fused loss."""
    _fit(tmp_path, demo_data, "--trainer.precision", "bf16-mixed", "--model.compile_step", "true",
         "--model.compile_mode", "reduce-overhead", "--model.fused_loss", "true")
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    _check_export(tmp_path)


def test_gpu_decode_matches_the_cpu_decode_cuda() -> None:
    """nvJPEG + crop/resize/flip on the GPU against the same calls on the CPU (libjpeg-turbo): the two
    decoders' IDCTs and the resize kernels may round differently, nothing more."""
    import io

    import numpy as np
    from PIL import Image

    from dualenc.data.gpu_decode import decode_batch

    rng = np.random.default_rng(0)
    datas = []
    for w, h in [(320, 240), (200, 300), (640, 480)]:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([x / w * 255, y / h * 255, np.sin(x / 7) * np.cos(y / 11) * 127 + 128], -1)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG")
        datas.append(buf.getvalue())
    crops = [(10, 20, 200, 180, 0), (0, 0, 300, 200, 1), (100, 50, 300, 400, 1)]
    from torchvision.transforms import InterpolationMode

    cpu = decode_batch(datas, crops, (64, 64), InterpolationMode.BICUBIC, "cpu")
    gpu = decode_batch(datas, crops, (64, 64), InterpolationMode.BICUBIC, "cuda")
    assert gpu.is_cuda and gpu.dtype == torch.uint8 and gpu.shape == cpu.shape
    diff = (gpu.cpu().int() - cpu.int()).abs().float()
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


def test_gpu_decode_fit_cuda(tmp_path: Path, demo_data: Path) -> None:
    """`dualenc fit` with data.gpu_decode: workers ship bytes, nvJPEG decodes on the GPU."""
    _fit(tmp_path, demo_data, "--trainer.precision", "bf16-mixed", "--data.gpu_decode", "true")
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
