"""Two real gloo processes on CPU must reproduce single-process training exactly.

Each rank encodes its half of a global batch with identical tiny towers, gathers features with
gradient, computes its local loss, backprops and averages parameter gradients the way DDP does.
The mean loss and every averaged parameter gradient must equal those of one process running the
full batch. One spawn does all the distributed work (process start-up dominates the cost); the
test functions then check what the workers saved.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dualenc.distributed import gather_features, gather_with_grad, world_info
from dualenc.losses import get_loss
from tests_helpers import spawn_ranks

WORLD = 2
LOCAL_B = 4
IN_DIM, HIDDEN, EMBED = 7, 12, 5
GATHER_SHAPE = (3, 2)  # trailing shape of the tensor used to test gather_with_grad alone
TIMEOUT_S = 90  # hard cap on the whole spawn; a healthy run takes a few seconds
CASES = {  # case name -> (registry name, loss kwargs)
    "contrastive": ("contrastive", {"label_smoothing": 0.1}),
    "siglip": ("siglip", {}),
}
DT = torch.float64


class TinyDualEncoder(nn.Module):
    def __init__(self, init_logit_scale: float, init_logit_bias: float) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, EMBED))
        self.text = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))  # stored as log
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor):
        return F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1)


def _build(case: str) -> tuple[TinyDualEncoder, torch.Tensor, torch.Tensor]:
    """Same seed -> identical weights and global inputs in every process."""
    spec = get_loss(CASES[case][0])
    torch.manual_seed(0)
    # Bias used by both cases so every parameter is exercised (contrastive ignores its value).
    bias = spec.init_logit_bias if spec.init_logit_bias is not None else -1.0
    model = TinyDualEncoder(spec.init_logit_scale, bias).to(DT)
    g = torch.Generator().manual_seed(1)
    x_img = torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g, dtype=DT)
    x_txt = torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g, dtype=DT)
    return model, x_img, x_txt


def _loss(case: str, model: TinyDualEncoder, img, txt, **gathered) -> torch.Tensor:
    name, kw = CASES[case]
    return get_loss(name).fn(img, txt, model.logit_scale.exp(), model.logit_bias, **kw, **gathered)


def _gather_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tensor for the gather test, and the weights it multiplies the gather by."""
    n = LOCAL_B * math.prod(GATHER_SHAPE)
    x = torch.arange(n, dtype=DT).reshape(LOCAL_B, *GATHER_SHAPE) + 100.0 * rank
    g = torch.Generator().manual_seed(10 + rank)
    w = torch.randn(WORLD * LOCAL_B, *GATHER_SHAPE, generator=g, dtype=DT)
    return x, w


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core box: no oversubscription
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        results: dict[str, torch.Tensor] = {"world_info": torch.tensor(world_info())}

        x, w = _gather_inputs(rank)
        x.requires_grad_()
        gathered = gather_with_grad(x)
        (gathered * w).sum().backward()
        results["gather/value"] = gathered.detach()
        results["gather/grad"] = x.grad

        for case in CASES:
            model, x_img, x_txt = _build(case)
            sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
            img, txt = model(x_img[sl], x_txt[sl])
            all_img, all_txt, offset = gather_features(img, txt)
            loss = _loss(case, model, img, txt, all_image_features=all_img,
                         all_text_features=all_txt, offset=offset)
            loss.backward()
            for p in model.parameters():  # what DDP does: average gradients over ranks
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= WORLD
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
            results[f"{case}/loss"] = mean_loss / WORLD
            results[f"{case}/offset"] = torch.tensor(offset)
            for n, p in model.named_parameters():
                results[f"{case}/grad/{n}"] = p.grad

            # Teeth check: a gather without gradient must NOT reproduce the full-batch grads.
            model.zero_grad()
            img, txt = model(x_img[sl], x_txt[sl])
            all_img, all_txt, _ = gather_features(img.detach(), txt.detach())
            _loss(case, model, img, txt, all_image_features=all_img,
                  all_text_features=all_txt, offset=offset).backward()
            for n, p in model.named_parameters():
                # siglip's text tower is reached only through the gather, so it may get None.
                g = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                results[f"{case}/nograd/{n}"] = g / WORLD

        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_worker, (str(out),), WORLD, TIMEOUT_S)
    return [torch.load(Path(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_world_info_per_rank(rank_results):
    for r, res in enumerate(rank_results):
        assert res["world_info"].tolist() == [r, WORLD]


def test_gather_with_grad_values_and_grads(rank_results):
    xs, ws = zip(*(_gather_inputs(r) for r in range(WORLD)))
    expected_value = torch.cat(xs)
    w_sum = sum(ws)
    for r, res in enumerate(rank_results):
        torch.testing.assert_close(res["gather/value"], expected_value, atol=0, rtol=0)
        torch.testing.assert_close(
            res["gather/grad"], w_sum[r * LOCAL_B : (r + 1) * LOCAL_B], atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_single_process(rank_results, case):
    model, x_img, x_txt = _build(case)
    img, txt = model(x_img, x_txt)
    loss = _loss(case, model, img, txt)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert set(ref) == {"image.0.weight", "image.0.bias", "image.2.weight", "image.2.bias",
                        "text.0.weight", "text.0.bias", "text.2.weight", "text.2.bias",
                        "logit_scale", "logit_bias"}

    for r, res in enumerate(rank_results):
        assert res[f"{case}/offset"].item() == r * LOCAL_B
        torch.testing.assert_close(res[f"{case}/loss"], loss.detach(), atol=1e-10, rtol=1e-10)
        for n, g in ref.items():
            torch.testing.assert_close(res[f"{case}/grad/{n}"], g, atol=1e-10, rtol=1e-8, msg=n)

    # The comparison is sensitive: dropping the gradient through the gather breaks it.
    worst = max((rank_results[0][f"{case}/nograd/{n}"] - g).abs().max().item()
                for n, g in ref.items())
    assert worst > 1e-4


def test_single_process_is_passthrough():
    assert not dist.is_initialized()
    assert world_info() == (0, 1)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    assert gather_with_grad(x) is x
    all_x, all_y, offset = gather_features(x, y)
    assert all_x is x and all_y is y and offset == 0
