"""End to end through the `dualenc` CLI: fit on tiny demo shards, export, resume, zero-shot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from dualenc.cli import main
from dualenc.export import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from dualenc.data_tools.demo import build_demo
    from dualenc.data_tools.tokenizer import iter_captions, train_wordpiece

    root = tmp_path_factory.mktemp("demo") / "demo"
    build_demo(root, n_train=384, n_val=128, n_heldout=96, image_size=32, shard_size=96, seed=1)
    train_wordpiece(iter_captions(str(root / "train")), root / "tokenizer", vocab_size=300)
    return root


def _config(tmp: Path, data: Path, **trainer) -> Path:
    cfg = {
        "__base__": str(REPO / "configs" / "demo.yaml"),
        "trainer": {"default_root_dir": str(tmp / "run"), "log_every_n_steps": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, **trainer,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True, "every_n_train_steps": 2,
                                       "save_top_k": -1}},
                        {"class_path": "dualenc.callbacks.SamplesPerSecond"},
                        {"class_path": "dualenc.callbacks.ExportOnFitEnd"}]},
        "model": {"model": {"image_tower": {"class_path": "dualenc.towers.TimmImageTower",
                                            "init_args": {"model_name": "test_efficientnet", "image_size": 32}},
                            "text_tower": {"class_path": "dualenc.towers.HFTextTower",
                                           "init_args": {"config": {"model_type": "bert", "hidden_size": 32,
                                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                                    "intermediate_size": 64},
                                                         "tokenizer": str(data / "tokenizer"),
                                                         "context_length": 16}},
                            "embed_dim": 16},
                  "scheduler": {"warmup_steps": 2, "total_steps": 8}},
        "data": {"train": str(data / "train"), "val": str(data / "val"), "batch_size": 32, "num_workers": 1},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_export_resume_and_zeroshot(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = _config(tmp_path, demo_data, max_steps=4)
    main(["fit", "--config", str(cfg)])
    ckpt_dir = tmp_path / "ckpt"
    first = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 4
    export = tmp_path / "run" / "export"
    model = load_model(export)
    for k, v in model.state_dict().items():  # the export at fit end is the trained model
        torch.testing.assert_close(v, first["state_dict"][f"model.{k}"])

    # Resume: the optimizer, scheduler and step counter continue from the checkpoint.
    main(["fit", "--config", str(_config(tmp_path, demo_data, max_steps=8)), "--ckpt_path", str(ckpt_dir / "last.ckpt")])
    second = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert second["global_step"] == 8
    assert second["lr_schedulers"][0]["last_epoch"] == 8
    adam_steps = {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert adam_steps == {8.0}
    resumed = load_model(export)
    changed = [k for k, v in resumed.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed  # training went on from the checkpoint

    # `dualenc export` from the checkpoint gives the same weights as the export at fit end.
    out = tmp_path / "export2"
    main(["export", "--config", str(cfg), "--ckpt_path", str(ckpt_dir / "last.ckpt"), "--out", str(out)])
    again = load_model(out)
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, resumed.state_dict()[k])

    capsys.readouterr()
    main(["zeroshot", "--model", str(export), "--data", str(demo_data / "heldout"), "--name", "held-out",
          "--workers", "0", "--json", str(tmp_path / "zs.json")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("zero-shot top-1 on held-out: ") and "(24 classes, chance 0.04)" in line
    assert (tmp_path / "zs.json").is_file()


def test_config_typo_fails_at_load_with_the_key(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = _config(tmp_path, demo_data, max_steps=1)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"__base__": str(cfg), "model": {"label_smoothingg": 0.1}}))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(typo)])
    assert "label_smoothingg" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran
