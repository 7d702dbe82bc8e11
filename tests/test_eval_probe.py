"""Linear probe (CLIP_benchmark's protocol, parity with its own code) and kNN classification on features."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.eval.knn import knn_classify, nearest_train
from dualenc.eval.probe import WEIGHT_DECAYS, linear_probe, train_linear


def _features(n: int, classes: int, dim: int, seed: int, noise: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features around one random direction per class (overlapping enough to make errors)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=-1)
    y = torch.arange(n) % classes
    return F.normalize(centers[y] + noise * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=-1), y


class _CudaNamedCpu(str):
    """Passes CLIP_benchmark's ``assert device == 'cuda'`` while every tensor stays on the CPU."""

    def __eq__(self, other: object) -> bool:
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.fixture
def clip_benchmark_on_cpu(monkeypatch: pytest.MonkeyPatch):
    """CLIP_benchmark's linear_probe module, its ``.cuda()`` calls made no-ops (this machine has no GPU)."""
    lp = pytest.importorskip("clip_benchmark.metrics.linear_probe")
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)

    def accuracy(output, target, topk=(1,)):  # its formula; its float() of a 1-element array fails under numpy 2
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]

    monkeypatch.setattr(lp, "accuracy", accuracy)
    return lp


def test_train_linear_equals_clip_benchmark_train(clip_benchmark_on_cpu) -> None:
    """One probe fit (several shuffled batches an epoch, cosine AdamW): bit-identical weights."""
    lp = clip_benchmark_on_cpu
    x, y = _features(90, 6, 12, seed=1)
    loader = torch.utils.data.DataLoader(lp.FeatureDataset(x, y), batch_size=16, shuffle=True)
    ref = lp.train(loader, 12, 6, 1e-3, 0.1, 3, False, "cpu", 7).module
    ours = train_linear(x, y, 6, 1e-3, lr=0.1, epochs=3, batch_size=16, seed=7)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    with torch.inference_mode():  # as in Lightning's test loop: fitting still works, to the same weights
        inf = train_linear(x.clone(), y.clone(), 6, 1e-3, lr=0.1, epochs=3, batch_size=16, seed=7)
    assert torch.equal(inf.weight, ref.weight)
    state = torch.get_rng_state()
    train_linear(x, y, 6, 0.0, epochs=1, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is left alone


@pytest.mark.filterwarnings("ignore:'pin_memory' argument")  # its loaders pin memory; there is no GPU here
def test_linear_probe_equals_clip_benchmark_evaluate(clip_benchmark_on_cpu, tmp_path: Path) -> None:
    """CLIP_benchmark's evaluate() (weight-decay search on a validation split, refit on train + val) on cached
    features gives our metrics and weight decay exactly."""
    lp = clip_benchmark_on_cpu
    train, val, test = _features(120, 10, 16, 1), _features(40, 10, 16, 2), _features(60, 10, 16, 3)
    d = tmp_path / "features" / "m"
    d.mkdir(parents=True)
    for split, (x, y) in {"train": train, "val": val, "test": test}.items():  # its feature cache: no model runs
        torch.save(x, d / f"features_{split}.pt")
        torch.save(y, d / f"targets_{split}.pt")
    kw = {"lr": 0.1, "epochs": 3, "batch_size": 32, "seed": 5}
    torch.manual_seed(123)
    ref = lp.evaluate(torch.nn.Identity(), None, None, -1, kw["batch_size"], 0, kw["lr"], kw["epochs"], "m",
                      kw["seed"], str(tmp_path / "features"), _CudaNamedCpu("cpu"), val_dataloader=[], amp=False)
    torch.manual_seed(123)
    perm = torch.randperm(120)  # the order its evaluate() puts the train rows in (fewshot_k=-1: all of them)
    ours = linear_probe(train[0][perm], train[1][perm], *test, val_x=val[0], val_y=val[1], **kw)
    assert 0.3 < ours["lp_acc1"] < 1.0  # a task with errors, so the comparison means something
    assert ours["weight_decay"] == ref["weight_decay"] and ours["weight_decay"] in WEIGHT_DECAYS
    for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "epochs", "seed", "fewshot_k"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["normalized"] is True and ours["top1"] == ours["lp_acc1"]
    assert len(ours["val_top1"]) < 7 + 3 * 4  # revisited grid points are not refitted


def test_linear_probe_carves_validation_and_checks_input() -> None:
    train, test = _features(100, 4, 8, 1, noise=0.3), _features(40, 4, 8, 2, noise=0.3)
    a = linear_probe(*train, *test, epochs=2)
    assert a == linear_probe(*train, *test, epochs=2)  # seeded
    assert a["top1"] > 0.9 and a["lp_acc5"] is None and a["top5"] == 1.0  # 4 classes: top-4 covers all
    assert linear_probe(*train, *test, epochs=2, val_proportion=0)["weight_decay"] == 0.0  # no search
    with pytest.raises(ValueError, match="never occurs in the train split"):
        linear_probe(train[0], train[1] % 3, *test, epochs=1)
    with pytest.raises(ValueError, match="feature sizes differ"):
        linear_probe(*train, test[0][:, :4], test[1], epochs=1)


def test_knn_chunked_equals_naive() -> None:
    train, test = _features(300, 7, 16, 1), _features(50, 7, 16, 2)
    full = test[0] @ train[0].T
    s, i = nearest_train(test[0], train[0], 20, test_chunk=7, train_chunk=33)
    ref_s, ref_i = full.topk(20, dim=1)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-6)
    out = knn_classify(*train, *test, ks=(1, 10, 20), test_chunk=7, train_chunk=33)
    for k in (1, 10, 20):  # naive DINO vote: every class's exp(sim / 0.07) summed over the k nearest
        w = (full.topk(k, dim=1).values.double() / 0.07).exp()
        scores = torch.zeros(50, 7, dtype=torch.float64).scatter_add_(1, train[1][ref_i[:, :k]], w)
        assert out[f"knn_top1@{k}"] == pytest.approx(float((scores.argmax(1) == test[1]).double().mean()))
    assert out["top1"] == out["knn_top1@1"] == float((train[1][ref_i[:, 0]] == test[1]).double().mean())
    assert out == knn_classify(*train, *test, ks=(1, 10, 20))  # chunking changes nothing


def test_knn_planted_votes() -> None:
    """One test point at angle 0; the nearest train point (class 1) is alone, the next three are class 0."""
    ang = torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0])
    train_x = torch.stack([ang.cos(), ang.sin()], 1)
    train_y = torch.tensor([1, 0, 0, 0, 1])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    uni = knn_classify(train_x, train_y, test_x, test_y, ks=(1, 4), weighting="uniform")
    assert uni["knn_top1@1"] == 0.0 and uni["knn_top1@4"] == 1.0  # 1-NN says 1; 3 votes to 1 say 0
    # DINO weights exp(cos/T): class 1 gets exp(cos .1/T), class 0 the sum of three; a small T lets the nearest win.
    def class0_over_class1(t: float) -> float:
        return sum(math.exp((math.cos(a) - math.cos(0.1)) / t) for a in (0.2, 0.3, 0.4))

    assert class0_over_class1(0.01) < 1 < class0_over_class1(0.07)  # 0.24 and 1.72
    assert knn_classify(train_x, train_y, test_x, test_y, ks=(4,), temperature=0.01)["knn_top1@4"] == 0.0
    assert knn_classify(train_x, train_y, test_x, test_y, ks=(4,), temperature=0.07)["knn_top1@4"] == 1.0
    big = knn_classify(train_x, train_y, test_x, test_y, ks=(50,), weighting="uniform")  # k > train: all 5
    assert big["knn_top1@50"] == 1.0  # 3 of class 0 against 2 of class 1
    with pytest.raises(ValueError, match="weighting must be one of"):
        knn_classify(train_x, train_y, test_x, test_y, weighting="cosine")
