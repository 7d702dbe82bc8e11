"""``dualenc test/validate/predict`` through the CLI, eval sets as data config, and user errors (exit 2)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dualenc.cli import main, make_cli
from dualenc.eval.suite import EvalSuite
from dualenc.runlock import LOCK_NAME
from tests_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
DUALENC = Path(sys.executable).parent / "dualenc"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dualenc"])


def eval_config(tmp: Path, data: Path) -> Path:
    """tests_helpers' tiny demo config with a zero-shot and a retrieval set under data.eval_sets."""
    path = tiny_config(tmp, data, logger=False)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(num_workers=0, eval_sets={
        "zeroshot": [{"name": "heldout", "data": str(data / "heldout")}],
        "retrieval": [{"name": "valret", "data": str(data / "val"), "ks": [1, 5]}],
        "num_workers": 0, "batch_size": 64})
    path.write_text(yaml.safe_dump(cfg))
    return path


def suite_metrics(cli, data: Path) -> dict[str, float]:
    suite = EvalSuite([{"name": "heldout", "data": str(data / "heldout")}],
                      [{"name": "valret", "data": str(data / "val"), "ks": (1, 5)}], batch_size=64, num_workers=0)
    cli.model.model.eval()
    return suite.run(cli.model.model)


def test_test_reports_the_eval_sets(tmp_path: Path, demo_data: Path) -> None:
    cfg = eval_config(tmp_path, demo_data)
    cli = make_cli(["test", "--config", str(cfg)])
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    expected = suite_metrics(cli, demo_data)
    assert set(expected) == {k.removeprefix("test/") for k in logged}
    for key, value in expected.items():  # the same numbers as the suite on the same weights
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert "test/heldout/top1" in logged and "test/valret/image_retrieval_recall@5" in logged


def test_test_with_test_shards_adds_the_loss(tmp_path: Path, demo_data: Path) -> None:
    cfg = eval_config(tmp_path, demo_data)
    cli = make_cli(["test", "--config", str(cfg), f"--data.test={demo_data / 'val'}", "--data.eval_sets=null"])
    assert set(cli.trainer.callback_metrics) == {"test/loss"}
    assert 0 < float(cli.trainer.callback_metrics["test/loss"]) < 20


def test_validate_reports_the_eval_sets_too(tmp_path: Path, demo_data: Path) -> None:
    cfg = eval_config(tmp_path, demo_data)
    cli = make_cli(["validate", "--config", str(cfg)])
    keys = set(cli.trainer.callback_metrics)
    assert "val/loss" in keys and "val/heldout/top1" in keys and "val/valret/text_retrieval_recall@1" in keys


def test_predict_writes_embeddings(tmp_path: Path, demo_data: Path) -> None:
    cfg = eval_config(tmp_path, demo_data)
    assert main(["predict", "--config", str(cfg), f"--data.predict={demo_data / 'val'}"]) == 0
    from dualenc.eval.store import load_embeddings

    out = tmp_path / "run" / "predictions"
    img, txt = load_embeddings(out / "image"), load_embeddings(out / "text")
    sizes = json.loads((demo_data / "val" / "sizes.json").read_text())
    assert len(img.ids) == len(txt.ids) == sum(sizes.values()) == 128  # every sample, none twice
    assert txt.ids == [f"{k}#0" for k in img.ids]
    # The vectors are the model's own: re-embed the first shard's images the suite's way and compare.
    cli = make_cli(["--config", str(cfg)], run=False)
    from dualenc.eval.encode import encode_images, eval_batches

    model = cli.model.model.eval()
    enc = encode_images(model, eval_batches(str(demo_data / "val"), model.image_tower.data_config, 64, 0,
                                            labels=False), "cpu")
    index = {k: i for i, k in enumerate(img.ids)}
    rows = torch.tensor([index[k] for k in enc.keys])
    torch.testing.assert_close(img.tensor()[rows], enc.embeddings.float(), atol=1e-5, rtol=1e-4)
    assert np.allclose(np.linalg.norm(txt.tensor().numpy(), axis=1), 1, atol=1e-4)
    # `dualenc retrieval` reads them as they are.
    assert main(["retrieval", "--images", str(out / "image"), "--texts", str(out / "text")]) == 0


def test_predict_without_shards_names_the_flag(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = eval_config(tmp_path, demo_data)
    assert main(["predict", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "--data.predict" in err and "Traceback" not in err


# -- eval sets are data --------------------------------------------------------------------------------

def test_demo_config_eval_sets_override_without_restating_callbacks(tmp_path: Path, demo_data: Path,
                                                                     tokenizer_dir: str, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    os.symlink(demo_data, tmp_path / "data" / "demo")  # demo.yaml's paths are relative to the working directory
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger=false"]
    cli = make_cli(args, run=False)
    sets = cli.datamodule.eval_sets
    assert [s.data for s in sets.zeroshot] == ["data/demo/heldout"] and not sets.retrieval
    callbacks = [type(c).__name__ for c in cli.trainer.callbacks]
    cli = make_cli(args + ["--data.eval_sets.zeroshot=[{name: other, data: data/demo/val, templates: imagenet}]",
                           "--data.eval_sets.retrieval=[{name: ret, data: data/demo/val}]"], run=False)
    sets = cli.datamodule.eval_sets
    assert [(s.name, s.data) for s in sets.zeroshot] == [("other", "data/demo/val")]
    assert [(s.name, s.data) for s in sets.retrieval] == [("ret", "data/demo/val")]
    assert [type(c).__name__ for c in cli.trainer.callbacks] == callbacks  # the list is untouched
    assert "EvalCallback" in callbacks


def test_missing_eval_set_fails_at_load_naming_the_path(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = eval_config(tmp_path, demo_data)
    code = main(["fit", "--config", str(cfg), "--data.eval_sets.zeroshot=[{name: zs, data: nowhere/test}]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.eval_sets.zeroshot[0] ('zs'): data 'nowhere/test' not found" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


# -- user errors --------------------------------------------------------------------------------------

def test_user_error_prints_no_traceback_and_debug_shows_it(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("DUALENC_DEBUG", None)
    args = [str(DUALENC), "fit", "--config", str(tmp_path / "missing.yaml")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "missing.yaml" in lines[0] and "does not exist; check --config" in lines[0]
    proc = subprocess.run(args + ["--debug"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_bad_config_value_is_one_line(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = eval_config(tmp_path, demo_data)
    assert main(["fit", "--config", str(cfg), "--model.model.text_tower.init_args.tokenizer=bert-base-uncased"]) == 2
    err = capsys.readouterr().err
    assert "dualenc fit: error: bad config: tokenizer 'bert-base-uncased' is not a local directory" in err
    assert "never downloads" in err and "Traceback" not in err


def test_incomplete_checkpoint_through_the_cli(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = eval_config(tmp_path, demo_data)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"x": 1}, ckpt / "epoch=0-step=2.ckpt")
    (ckpt / "last.ckpt").write_bytes(b"")
    assert main(["fit", "--config", str(cfg), f"--ckpt_path={ckpt / 'last.ckpt'}"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt / 'last.ckpt'} is empty" in err and f"--ckpt_path {ckpt / 'epoch=0-step=2.ckpt'}" in err
    export = ["export", "--config", str(cfg), "--ckpt_path", str(ckpt / "last.ckpt"), "--out", str(tmp_path / "e")]
    assert main(export) == 2
    assert "incomplete" in capsys.readouterr().err


def test_fit_refuses_an_output_folder_in_use(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = eval_config(tmp_path, demo_data)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "x"}))
        assert main(["fit", "--config", str(cfg), "--trainer.max_steps=1"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"output folder {run} is in use by another run (pid {holder.pid}" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()  # refused before training
    # The holder is gone now (as after a crash): the stale lock does not block the next run, which
    # releases its own lock when it ends.
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps=1", "--data.eval_sets=null"]) == 0
    assert not (run / LOCK_NAME).exists()


def test_fit_runs_data_eval_sets_through_a_setless_callback(tmp_path: Path, demo_data: Path) -> None:
    cfg_path = eval_config(tmp_path, demo_data)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "dualenc.eval.callback.EvalCallback",
                                        "init_args": {"every_n_steps": 2, "every_n_epochs": None}})
    cfg_path.write_text(yaml.safe_dump(cfg))
    cli = make_cli(["fit", "--config", str(cfg_path), "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EvalCallback")
    assert callback.suite is not None and [s.name for s in callback.suite.zeroshot] == ["heldout"]
    metrics = cli.trainer.callback_metrics
    assert "eval/heldout/top1" in metrics and "eval/valret/image_retrieval_recall@1" in metrics
    assert 0 <= float(metrics["eval/heldout/top1"]) <= 1


def test_shards_without_counts_fail_in_one_line_naming_the_flag(tmp_path: Path, demo_data: Path, capsys) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(demo_data / "train" / sorted(p.name for p in (demo_data / "train").glob("*.tar"))[0], bare)
    cfg = eval_config(tmp_path, demo_data)
    assert main(["fit", "--config", str(cfg), f"--data.train={bare}", "--data.eval_sets=null"]) == 2
    err = capsys.readouterr().err
    assert "no sizes.json or *_stats.json beside the shards" in err and "--data.epoch_samples" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_test_with_nothing_to_test_says_what_to_set(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = eval_config(tmp_path, demo_data)
    assert main(["test", "--config", str(cfg), "--data.eval_sets=null"]) == 2
    err = capsys.readouterr().err
    assert "nothing to test: set --data.eval_sets" in err and "--data.test" in err and "Traceback" not in err


def test_test_runs_linear_probe_and_knn_sets(tmp_path: Path, demo_data: Path) -> None:
    """data.eval_sets.linear_probe / knn from the command line, fitted inside Lightning's inference-mode test loop."""
    from test_eval_image_sets import image_root

    root = image_root(tmp_path / "colors")
    cfg = eval_config(tmp_path, demo_data)
    cli = make_cli(["test", "--config", str(cfg), f"--data.eval_sets.linear_probe=[{{name: lp, data: {root}, "
                    "epochs: 2}]", f"--data.eval_sets.knn=[{{name: nn, data: {root}, ks: [1, 3]}}]"])
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    cli.model.model.eval()
    expected = EvalSuite(linear_probe=[{"name": "lp", "data": str(root), "epochs": 2}],
                         knn=[{"name": "nn", "data": str(root), "ks": (1, 3)}], batch_size=64,
                         num_workers=0).run(cli.model.model)
    assert {"lp/top1", "lp/weight_decay", "nn/knn_top1@3"} <= set(expected)
    for key, value in expected.items():
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
