"""LearnedQ under DDP: two real gloo processes on CPU, each seeing different data and starting from a
different global RNG state, must hold the identical Q (and running means) after the first-batch
initialisation and after a few training steps.

The plugin must not rely on DDP's buffer broadcast for this (it is optional: ``broadcast_buffers``),
so both settings are run. Q is non-square (6 -> 8 dims): the orthogonal parametrization then completes
Q with random columns (its ``base`` buffer), which would differ between ranks unless the plugin shares them.
A last test runs ``dualenc fit`` with the plugin under Lightning's DDP on 2 CPU processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from dualenc.plugins.learned_q import LearnedQ
from dualenc.plugins.procrustes import procrustes_q
from dualenc.plugins.targets import Target
from tests_helpers import spawn_ranks

WORLD, B, PIX, VOCAB = 2, 8, 12, 40
SRC, TGT = 6, 8
STEPS = 4
TIMEOUT_S = 120


class FakeTarget(Target):
    """A frozen 'model': fixed linear maps of the flattened pixels and a fixed table of word vectors."""

    kind = "fake"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)  # the same on every rank
        self.w = torch.randn(PIX, TGT, generator=g)
        self.table = torch.randn(VOCAB, TGT, generator=g)
        self.name, self.embed_dim = "fake", TGT

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1) @ self.w

    def _text(self, texts: list[str]) -> torch.Tensor:
        return self.table[torch.tensor([int(t[1:]) for t in texts])]


class Student(nn.Module):
    def __init__(self, plugin: LearnedQ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(PIX, SRC)
        self.text = nn.Embedding(VOCAB, SRC)
        self.plugin = plugin

    def forward(self, batch: dict) -> torch.Tensor:
        out = SimpleNamespace(image_features=F.normalize(self.image(batch["image"].flatten(1)), dim=-1),
                              text_features=F.normalize(self.text(batch["ids"]), dim=-1))
        return sum(self.plugin.training_losses(batch, out).values())


def _batch(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * rank + step)  # every rank sees other data
    ids = torch.randint(0, VOCAB, (B,), generator=g)
    return {"image": torch.randn(B, 3, 2, 2, generator=g) + rank, "ids": ids, "text": [f"w{i}" for i in ids.tolist()]}


def _state(plugin: LearnedQ) -> dict[str, torch.Tensor]:
    s = {"q": plugin.q.detach().clone()}
    s.update({k: v.detach().clone() for k, v in plugin.named_buffers()})  # means, steps, the parametrization's base
    return s


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results: dict[str, torch.Tensor] = {}
        for broadcast in (False, True):
            plugin = LearnedQ(FakeTarget(), kernel_weight=1.0, embed_dim=SRC, mean_momentum=0.5)
            model = nn.parallel.DistributedDataParallel(Student(plugin), broadcast_buffers=broadcast)
            torch.manual_seed(123 + 7 * rank)  # a different global RNG state on each rank from here on
            opt = torch.optim.SGD(model.parameters(), lr=0.2)
            tag = f"bb{int(broadcast)}"
            for step in range(STEPS):
                batch = _batch(rank, step)
                if step == 0:  # what this rank alone would fit on its first batch (the test's teeth)
                    with torch.no_grad():
                        f = model.module.image(batch["image"].flatten(1))
                        ft = plugin.target.encode_image(batch["image"])
                        f = F.normalize(f, dim=-1).double()
                        results[f"{tag}/local_q"] = procrustes_q(f - f.mean(0), ft.double() - ft.double().mean(0),
                                                                 use_scipy=False).float()
                loss = model(batch)
                if step == 0:
                    results.update({f"{tag}/init/{k}": v for k, v in _state(plugin).items()})
                opt.zero_grad()
                loss.backward()
                opt.step()
            results.update({f"{tag}/end/{k}": v for k, v in _state(plugin).items()})
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("learned_q_ddp")
    spawn_ranks(_worker, (str(out),), WORLD, TIMEOUT_S)
    return [torch.load(Path(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("broadcast_buffers", [False, True])
def test_ranks_hold_the_same_q_and_means(ranks, broadcast_buffers: bool) -> None:
    r0, r1 = ranks
    tag = f"bb{int(broadcast_buffers)}"
    # The ranks' own first-batch fits differ, so agreement below is the plugin's doing.
    assert not torch.allclose(r0[f"{tag}/local_q"], r1[f"{tag}/local_q"], atol=1e-3)
    torch.testing.assert_close(r0[f"{tag}/init/q"], r0[f"{tag}/local_q"], atol=1e-5, rtol=0)  # rank 0's fit wins
    for phase in ("init", "end"):
        keys = sorted(k for k in r0 if k.startswith(f"{tag}/{phase}/"))
        assert {f"{tag}/{phase}/{k}" for k in ("q", "image_source_mean", "image_target_mean", "text_source_mean",
                                               "text_target_mean", "steps")} <= set(keys)
        for k in keys:
            torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0, msg=f"{k} differs between ranks")
    q = r0[f"{tag}/end/q"]
    torch.testing.assert_close(q.T @ q, torch.eye(SRC), atol=1e-5, rtol=0)  # still (semi-)orthogonal
    assert not torch.allclose(q, r0[f"{tag}/init/q"], atol=1e-4)  # and it did train
    assert int(r0[f"{tag}/end/steps"]) == STEPS


def test_lightning_ddp_fit_with_learned_q(tmp_path: Path, demo_data: Path) -> None:
    """Setting the first-batch Q by assignment once swapped the parameter's storage: DDP then saw Q as unused
    and the second step failed. Four steps of a real 2-process fit must run and checkpoint Q."""
    from test_eval_support import tiny_model
    from tests_helpers import REPO, tiny_config

    from dualenc.export import export_model

    teacher = export_model(tiny_model(5), tmp_path / "teacher")
    cfg = tiny_config(tmp_path, demo_data, max_steps=4)
    c = yaml.safe_load(cfg.read_text())
    c["model"]["plugins"] = [{"class_path": "dualenc.plugins.LearnedQ",
                              "init_args": {"target": "dualenc", "target_args": {"path": str(teacher)},
                                            "kernel_weight": 1.0}}]
    cfg.write_text(yaml.safe_dump(c))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(Path(sys.executable).parent / "dualenc"), "fit", "--config", str(cfg),
           "--config", str(REPO / "configs" / "strategy" / "ddp.yaml"), "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--data.num_workers", "0", "--trainer.sync_batchnorm", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    state = ckpt["state_dict"]
    assert int(state["plugins.0.steps"]) == 4
    q = state["plugins.0.map.parametrizations.weight.original"]
    assert q.shape == (16, 16) and torch.isfinite(q).all()
