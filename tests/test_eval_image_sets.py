"""Linear probe and kNN wired in: the commands, EvalSuite / data.eval_sets (two gloo ranks: test_eval_callback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_support import tiny_export, write_labelled_shards
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.cli import main
from dualenc.data.evalsets import as_eval_sets
from dualenc.errors import ConfigError, UserError
from dualenc.eval.imagesets import embed_splits
from dualenc.eval.knn import knn_classify
from dualenc.eval.probe import linear_probe
from dualenc.eval.suite import EvalSuite
from dualenc.export import load_model


def image_root(root: Path) -> Path:
    """A CLIP_benchmark root: train 16 images over 4 shards, test 12 over 3, classnames.txt in root/."""
    names = write_labelled_shards(root / "train", per_class=4, shard_size=4, with_lists=False)
    write_labelled_shards(root / "test", per_class=3, shard_size=4, with_lists=False)
    (root / "classnames.txt").write_text("\n".join(f"{n} square" for n in names) + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("imagesets")
    return image_root(tmp / "colors"), tiny_export(tmp)


def image_sets(root: Path) -> dict[str, list[dict]]:
    return {"linear_probe": [{"name": "lp", "data": str(root), "epochs": 2, "val_proportion": 0.25}],
            "knn": [{"name": "nn", "data": str(root), "ks": (1, 3), "weighting": "uniform"}]}


def test_commands_equal_the_functions_on_the_same_embeddings(setup, tmp_path: Path, capsys) -> None:
    root, export = setup
    lp_json, knn_json = tmp_path / "lp.json", tmp_path / "knn.json"
    assert main(["linear-probe", "--model", str(export), "--data", str(root), "--workers", "0", "--epochs", "2",
                 "--json", str(lp_json), "--plots", str(tmp_path)]) == 0
    assert main(["knn", "--model", str(export), "--data", str(root), "--workers", "0", "--ks", "1", "3",
                 "--json", str(knn_json)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe top-1" in printed and "kNN top-1 (dino vote, 16 train images): k=1" in printed
    train, test = embed_splits(load_model(export), str(root), batch_size=5, num_workers=0)
    assert train.keys == sorted(train.keys) and train.labels.bincount().tolist() == [4, 4, 4, 4]
    lp, nn = json.loads(lp_json.read_text()), json.loads(knn_json.read_text())
    ref = linear_probe(train.embeddings, train.labels, test.embeddings, test.labels, epochs=2)
    assert lp["task"] == "linear_probe" and lp["dataset"] == "colors"
    for key in ("lp_acc1", "lp_mean_per_class_recall", "weight_decay", "top5"):
        assert lp["metrics"][key] == ref[key], key
    assert lp["metrics"]["lp_acc5"] is None and lp["details"]["classnames"][0] == "red square"
    assert (tmp_path / "colors_per_class.png").is_file()
    ref = knn_classify(train.embeddings, train.labels, test.embeddings, test.labels, ks=(1, 3))
    assert nn["task"] == "knn_classification" and nn["metrics"]["knn_top1@3"] == ref["knn_top1@3"]
    assert nn["metrics"]["samples"] == 12 and nn["metrics"]["train_samples"] == 16
    capsys.readouterr()
    assert main(["knn", "--model", str(export), "--data", str(root / "test"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "not a CLIP_benchmark root" in err and "Traceback" not in err


def test_eval_sets_config_runs_in_the_suite(setup) -> None:
    root, export = setup
    sets = as_eval_sets(image_sets(root))
    assert sets and sets.knn[0].weighting == "uniform" and sets.linear_probe[0].epochs == 2
    sets.check_paths()
    suite = EvalSuite(batch_size=5, num_workers=0, **sets.set_kwargs())
    suite.check()
    out = suite.run(load_model(export))
    assert set(out) == set(suite.keys()) == {"lp/top1", "lp/top5", "lp/mean_per_class_recall", "lp/weight_decay",
                                             "nn/knn_top1@1", "nn/knn_mean_per_class_recall@1", "nn/knn_top1@3",
                                             "nn/knn_mean_per_class_recall@3"}
    train, test = embed_splits(load_model(export), str(root), num_workers=0)
    ref = knn_classify(train.embeddings, train.labels, test.embeddings, test.labels, ks=(1, 3), weighting="uniform")
    assert out["nn/knn_top1@3"] == ref["knn_top1@3"]
    assert [r["task"] for r in suite.records] == ["linear_probe", "knn_classification"]
    with pytest.raises(ConfigError, match=r"data.eval_sets.knn\[0\] \('nn'\): data"):
        as_eval_sets({"knn": [{"name": "nn", "data": str(root / "missing")}]}).check_paths()
    bad = EvalSuite(knn=[{"name": "nn", "data": str(root), "split": "val"}])
    with pytest.raises(UserError, match="evaluation set 'nn'.*no split 'val'.*--split / split"):
        bad.check()
    # A flat shard folder has no train/test: it would score the probe on the images it was fitted on.
    flat = EvalSuite(linear_probe=[{"name": "lp", "data": str(root / "test")}])
    with pytest.raises(UserError, match="not a CLIP_benchmark root.*ROOT/train/\\*.tar"):
        flat.check()
    with pytest.raises(UserError, match="both 'test'"):
        EvalSuite(knn=[{"name": "nn", "data": str(root), "train_split": "test"}]).check()
