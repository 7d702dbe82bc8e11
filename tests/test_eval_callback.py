"""EvalCallback: single-process Lightning wiring, and the suite under two real gloo processes."""

from __future__ import annotations

import csv
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_eval_support import tiny_model, write_caption_shards, write_labelled_shards
from test_eval_image_sets import image_root, image_sets
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.errors import UserError
from dualenc.eval.callback import EvalCallback
from dualenc.eval.suite import EvalSuite
from tests_helpers import spawn_ranks

WORLD = 2
TIMEOUT_S = 240  # a hang guard: the two ranks build a model and two eval sets each; slow on loaded cores


def _sets(root: Path) -> tuple[list[dict], list[dict]]:
    zs = [{"name": "cls", "data": str(root / "cls")},  # 3 shards: ranks get 2 and 1
          {"name": "one", "data": str(root / "one"), "templates": "imagenet"}]  # 1 shard: rank 1 gets none
    # Duplicate captions tie exactly only where their embeddings are bit-equal, which batch composition (3 vs 5
    # per batch here) can change; the comparison with one process uses the convention it was written for.
    rt = [{"name": "cap", "data": str(root / "cap"), "ks": [1, 3], "ties": "optimistic"}]
    return zs, rt


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    write_labelled_shards(root / "cls", per_class=3, shard_size=4)
    write_labelled_shards(root / "one", per_class=1, shard_size=10)
    write_caption_shards(root / "cap", n=9, shard_size=3)
    image_root(root / "colors")  # train/ and test/: linear probe and kNN
    from dualenc.data_tools.writer import ShardWriter

    with ShardWriter(root / "bad", max_count=1) as w:  # only unreadable images, over 2 shards
        for i in range(2):
            w.write(f"x{i}", b"not an image", "caption", extra={"cls": 0})
    (root / "bad" / "classnames.txt").write_text("thing\n")
    return root


def _worker(rank: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core box
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        zs, rt = _sets(Path(root))
        suite = EvalSuite(zs, rt, batch_size=3, num_workers=0)
        result = {"metrics": suite.run(tiny_model()), "records": suite.records}
        # Linear probe and kNN: embedded on both ranks, gathered, scored on rank 0 in sample-key order.
        image = EvalSuite(batch_size=3, num_workers=0, **image_sets(Path(root) / "colors"))
        result["image"] = {"metrics": image.run(tiny_model()), "records": image.records}
        try:  # an empty set must fail on every rank, with its name, instead of hanging
            bad = {"name": "bad", "data": str(Path(root) / "bad"), "templates": "imagenet"}
            EvalSuite([bad], num_workers=0).run(tiny_model())
        except (ValueError, RuntimeError) as e:  # rank 0 has the reason; the others are told it failed there
            result["error"] = f"{type(e).__name__}: {e}"
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_worker, (str(data), str(out)), WORLD, TIMEOUT_S)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_ranks_gather_and_agree_with_one_process(data: Path, rank_results: list[dict]) -> None:
    zs, rt = _sets(data)
    ref = EvalSuite(zs, rt, batch_size=5, num_workers=0).run(tiny_model())
    assert set(ref) == {f"{s}/{k}" for s in ("cls", "one") for k in ("top1", "top5", "mean_per_class_recall")} | {
        f"cap/{d}_{m}" for d in ("image_retrieval", "text_retrieval")
        for m in ("recall@1", "recall@3", "mean_rank", "median_rank")}
    for res in rank_results:  # every rank gets rank 0's numbers, equal to a single process's
        assert res["metrics"] == pytest.approx(ref, abs=1e-6)
    records = {r["dataset"]: r for r in rank_results[0]["records"]}
    # Each image was embedded by exactly one rank: the gathered sets have their true sizes.
    assert records["cls"]["metrics"]["samples"] == 12 and records["one"]["metrics"]["samples"] == 4
    assert records["cap"]["metrics"]["images"] == 9 and records["cap"]["metrics"]["texts"] == 18
    assert rank_results[1]["records"] == []  # only rank 0 scores
    image = EvalSuite(batch_size=5, num_workers=0, **image_sets(data / "colors")).run(tiny_model())
    for res in rank_results:  # the probe's seeded split sees the rows in the same (key) order as one process
        assert res["image"]["metrics"] == pytest.approx(image, abs=1e-6)
    assert rank_results[1]["image"]["records"] == []
    assert rank_results[0]["image"]["records"][1]["metrics"]["train_samples"] == 16
    assert rank_results[0]["error"].startswith("ValueError: evaluation set 'bad'")
    assert "empty" in rank_results[0]["error"]
    assert rank_results[1]["error"] == "RuntimeError: evaluation set 'bad' failed on rank 0; see its error"


def _batches(model, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tok = model.text_tower.tokenizer_fn()
    return [{"image": torch.randn(4, 3, 32, 32, generator=g), **tok([f"caption {i}" for i in range(4)])}
            for _ in range(n)]


def test_callback_logs_under_lightning(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from dualenc.module import DualEncoderModule

    model = tiny_model()
    zs, rt = _sets(data)
    cb = EvalCallback(zeroshot=zs[:1], retrieval=rt, every_n_epochs=1, every_n_steps=2, batch_size=4, num_workers=0,
                      results_dir=str(tmp_path / "results"))
    module = DualEncoderModule(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=CSVLogger(tmp_path, name="logs"),
                        callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(model, 4), batch_size=None))
    # Steps 2 and 4 (the epoch's end is step 4 too: evaluated once).
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["eval-step00000002.json",
                                                                        "eval-step00000004.json"]
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    assert logged == pytest.approx(cb.last_metrics, abs=1e-6) and "eval/cls/top1" in logged
    expected = EvalSuite(zs[:1], rt, num_workers=0).run(model.eval())
    assert cb.last_metrics == pytest.approx({f"eval/{k}": v for k, v in expected.items()}, abs=1e-6)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    assert [r["step"] for r in rows if r.get("eval/cls/top1")] == ["2", "4"]  # once per evaluation
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval at step")]
    assert printed == [f"eval at step {n}: cls/top1 {v:.3f}, cap/image_retrieval_recall@1 {r:.3f}, "
                       f"cap/text_retrieval_recall@1 {t:.3f}" for n, v, r, t in
                       [(2, *printed_values(tmp_path / "results" / "eval-step00000002.json")),
                        (4, *printed_values(tmp_path / "results" / "eval-step00000004.json"))]]
    records = json.loads((tmp_path / "results" / "eval-step00000004.json").read_text())
    assert [r["task"] for r in records] == ["zeroshot_classification", "zeroshot_retrieval"]


def printed_values(path: Path) -> tuple[float, float, float]:
    records = {r["task"]: r["metrics"] for r in json.loads(path.read_text())}
    rt = records["zeroshot_retrieval"]
    return (records["zeroshot_classification"]["top1"], rt["image_retrieval_recall@1"], rt["text_retrieval_recall@1"])


def test_callback_config_errors(data: Path) -> None:
    assert EvalCallback().suite is None  # sets come from data.eval_sets at fit start (or none: inactive)
    with pytest.raises(ValueError, match="unique"):
        EvalCallback(zeroshot=[{"name": "a", "data": str(data / "cls")}, {"name": "a", "data": str(data / "one")}])
    with pytest.raises(ValueError, match="'name' and 'data'"):
        EvalCallback(retrieval=[{"data": str(data / "cap")}])
    with pytest.raises(UserError, match="'c'.*classnames.txt"):
        EvalCallback(zeroshot=[{"name": "c", "data": str(data / "cap")}]).suite.check()
    with pytest.raises(ValueError, match="never runs"):
        EvalCallback(zeroshot=[{"name": "c", "data": str(data / "cls")}], every_n_epochs=None)


def test_callback_reads_sets_at_fit_start_not_when_built(data: Path, tmp_path: Path) -> None:
    """A config may name eval data that a later step creates; a set still missing at fit start stops fit."""
    import shutil

    import lightning as L

    from dualenc.module import DualEncoderModule

    later = tmp_path / "later"
    cb = EvalCallback(zeroshot=[{"name": "zs", "data": str(later)}], retrieval=[{"name": "rt", "data": str(later)}],
                      num_workers=0)  # nothing there yet: building must not read it

    class Boom(L.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            raise AssertionError("training started despite a missing evaluation set")

    model = tiny_model()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, callbacks=[cb, Boom()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(_batches(model, 1), batch_size=None)
    with pytest.raises(FileNotFoundError, match="evaluation set 'zs'.*matches no file"):
        trainer.fit(DualEncoderModule(model), train_dataloaders=loader)

    shutil.copytree(data / "cls", later)  # labelled shards with classnames.txt, captions too
    cb.suite.check()
    names = [n.strip() for n in (data / "cls" / "classnames.txt").read_text().splitlines() if n.strip()]
    assert cb.suite.zeroshot[0].prompts[0] == names
