"""The ``dualenc`` command: help, subcommand dispatch, config printing and ``dualenc export``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_BERT
from dualenc.cli import extra_commands, main, make_cli
from dualenc.export import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
DUALENC = Path(sys.executable).parent / "dualenc"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dualenc"])


def write_shard(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        data = b"a red square"
        info = tarfile.TarInfo("000000000.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def tiny_config(tmp: Path, tokenizer: str, shard: Path) -> Path:
    """demo.yaml with tiny towers, everything pointing into ``tmp``."""
    cfg = {
        "__base__": str(ROOT / "configs" / "demo.yaml"),
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp / "run")},
        "model": {"model": {"image_tower": {"init_args": {"model_name": "test_efficientnet", "image_size": 32}},
                            "text_tower": {"init_args": {"config": dict(TINY_BERT), "tokenizer": tokenizer,
                                                         "context_length": 16}},
                            "embed_dim": 16}},
        "data": {"train": str(shard), "val": None, "eval_sets": None},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_subprocess():
    assert DUALENC.is_file(), DUALENC
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(DUALENC), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "export" in proc.stdout and "zeroshot" in proc.stdout
    assert "fit" in proc.stdout and "--config" in proc.stdout


@pytest.mark.parametrize("command", sorted(extra_commands()))
def test_extra_command_help(command, capsys):
    with pytest.raises(SystemExit) as err:
        main([command, "--help"])
    assert err.value.code == 0
    assert f"dualenc {command}" in capsys.readouterr().out


def test_zeroshot_help_lists_options(capsys):
    with pytest.raises(SystemExit) as err:
        main(["zeroshot", "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--data" in out


def test_export_requires_arguments(capsys):
    with pytest.raises(SystemExit) as err:
        main(["export", "--config", "x.yaml"])
    assert err.value.code == 2
    assert "--ckpt_path" in capsys.readouterr().err


def test_print_config_follows_base(tmp_path, tokenizer_dir, capsys):
    cfg = tiny_config(tmp_path, tokenizer_dir, write_shard(tmp_path / "shards" / "00000.tar"))
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(cfg), "--trainer.max_steps=7", "--print_config"])
    assert err.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7
    assert printed["trainer"]["max_epochs"] == 4  # demo.yaml, two levels up
    assert printed["trainer"]["gradient_clip_val"] == 1.0  # base.yaml
    tower = printed["model"]["model"]["init_args"]["image_tower"]["init_args"]
    assert tower["model_name"] == "test_efficientnet" and tower["image_size"] == 32
    assert not (tmp_path / "run").exists()  # nothing ran


def _checkpoint(tmp_path: Path, cfg: Path) -> tuple[Path, dict]:
    """A checkpoint whose weights differ from the config's fresh (seeded) init."""
    cli = make_cli(["--config", str(cfg)], run=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in cli.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    state = {k: v.clone() for k, v in cli.model.state_dict().items()}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, path)
    return path, state


def test_export_command(tmp_path, tokenizer_dir, capsys):
    cfg = tiny_config(tmp_path, tokenizer_dir, write_shard(tmp_path / "shards" / "00000.tar"))
    ckpt, state = _checkpoint(tmp_path, cfg)
    out = tmp_path / "exported"
    assert main(["export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out", str(out)]) == 0
    assert f"exported model to {out}" in capsys.readouterr().out
    model = load_model(out)
    loaded = model.state_dict()
    assert set(loaded) == {k[len("model."):] for k in state}
    for k, v in loaded.items():
        torch.testing.assert_close(v, state[f"model.{k}"], rtol=0, atol=0, msg=k)
    batch = model.text_tower.tokenizer_fn()(["a red square"])
    assert model.encode_text(batch["input_ids"], batch["attention_mask"]).shape == (1, 16)


def test_export_command_needs_no_training_data(tmp_path, tokenizer_dir):
    shard = write_shard(tmp_path / "shards" / "00000.tar")
    cfg = tiny_config(tmp_path, tokenizer_dir, shard)
    ckpt, _ = _checkpoint(tmp_path, cfg)
    shard.unlink()  # e.g. exporting on another machine than the one that trained
    main(["export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "model.safetensors").is_file()
