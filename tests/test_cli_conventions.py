"""CLI conventions: progress bars (on a terminal or when forced), defaults in --help, 0-sample outputs fail."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from dualenc.cli import extra_commands, main
from dualenc.data_tools.cli import SUBCOMMANDS, build_parser
from dualenc.data_tools.cli import main as data_main
from dualenc.progress import enabled, progress

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dualenc"])


def test_progress_follows_the_terminal_and_the_env(monkeypatch, capsys) -> None:
    monkeypatch.delenv("DUALENC_PROGRESS", raising=False)
    assert not enabled()  # pytest's stderr is not a terminal
    list(progress(range(5), desc="quiet"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert enabled()
    monkeypatch.setenv("DUALENC_PROGRESS", "0")
    assert not enabled()
    monkeypatch.setenv("DUALENC_PROGRESS", "1")
    list(progress(range(7), desc="loud", unit="thing"))
    err = capsys.readouterr().err
    assert "loud" in err and "7/7" in err and "thing" in err


@pytest.mark.parametrize("command, total", [("stats", "384/384 "), ("tokenizer", "4/4 "), ("filter", "384/384 ")])
def test_data_commands_show_totals(command, total, demo_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DUALENC_PROGRESS", "1")
    args = {"stats": ["--no-plots"], "tokenizer": ["--vocab-size", "200"], "filter": ["--min-side", "1"]}[command]
    code = data_main([command, "--shards", str(demo_data / "train"), "--out", str(tmp_path / "o"), *args])
    assert code == 0
    assert total in capsys.readouterr().err  # the total comes from sizes.json: an ETA is shown


def test_zeroshot_command_shows_images_out_of_the_total(demo_data: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    from dualenc.export import export_model
    from dualenc.model import DualEncoder
    from dualenc.towers import HFTextTower, TimmImageTower

    import torch

    from conftest import TINY_BERT

    torch.manual_seed(0)
    model = DualEncoder(TimmImageTower("test_efficientnet", image_size=32),
                        HFTextTower(config=dict(TINY_BERT), tokenizer=str(demo_data / "tokenizer"), context_length=16),
                        embed_dim=16)
    export_model(model, tmp_path / "export")
    monkeypatch.setenv("DUALENC_PROGRESS", "1")
    assert main(["zeroshot", "--model", str(tmp_path / "export"), "--data", str(demo_data / "heldout"),
                 "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "96/96" in err and "image" in err


def _option_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    fmt = parser._get_formatter()  # the parser's own formatter class
    return {a.option_strings[-1]: fmt._get_help_string(a) % {"default": a.default}
            for a in parser._actions if a.option_strings}


def test_help_shows_defaults_on_every_data_and_eval_subcommand(capsys) -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(SUBCOMMANDS)
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, []):
                helps = _option_helps(p)
                assert "default" in helps[action.option_strings[-1]].lower(), (name, action.option_strings)
    with pytest.raises(SystemExit):
        data_main(["filter", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help lines wrap
    assert "(default: 200)" in out and "(default: 3.0)" in out
    for command in ("zeroshot", "retrieval", "embed", "align"):
        assert command in extra_commands()
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        if command != "align":
            assert "(default: 256)" in out, command  # --batch-size
    with pytest.raises(SystemExit):
        main(["align", "embed", "--help"])
    assert "(default: 256)" in " ".join(capsys.readouterr().out.split())


def test_filter_that_keeps_nothing_fails_with_the_reasons(demo_data: Path, tmp_path: Path, capsys) -> None:
    # Before: the default --min-side 200 dropped every 32 px image and the command exited 0.
    code = data_main(["filter", "--shards", str(demo_data / "val"), "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 1
    assert "0 of 128 samples written (image_too_small 128)" in err
    assert "relax it with --min-side or --disable image_too_small" in err


def test_build_that_writes_nothing_fails_with_the_reasons(tmp_path: Path, capsys) -> None:
    # Before: `build --table` with image paths relative to another folder reported the misses and exited 0.
    table = tmp_path / "table" / "pairs.csv"
    table.parent.mkdir()
    table.write_text("image,caption\nimgs/a.jpg,a red square\nimgs/b.jpg,a blue circle\n")
    code = data_main(["build", "--table", str(table), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "0 of 2 samples written (" in err and "--image-root" in err


def test_report_reads_tensorboard_event_files(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    from dualenc.eval.tbevents import read_tensorboard_metric

    logger = TensorBoardLogger(tmp_path / "run", name="tensorboard")
    for step, value in [(0, 0.07), (10, 0.065), (20, 0.06)]:
        logger.log_metrics({"train/temperature": value, "train/loss": 4.0 - step / 10}, step=step)
    logger.finalize("success")
    steps, values = read_tensorboard_metric(tmp_path / "run")
    assert steps == [0, 10, 20] and values == pytest.approx([0.07, 0.065, 0.06])
    assert main(["report", "--tensorboard", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "train_temperature.png").is_file()
    assert main(["report", "--tensorboard", str(tmp_path / "run"), "--column", "val/x", "--out", str(tmp_path)]) == 2
    assert "no scalar 'val/x'" in capsys.readouterr().err


def test_default_loggers_keep_the_csv_and_add_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from dualenc.cli import default_loggers

    csv, tb = default_loggers(str(tmp_path))
    assert isinstance(csv, CSVLogger) and isinstance(tb, TensorBoardLogger)
    assert Path(csv.log_dir).parent == tmp_path / "lightning_logs"
    assert Path(tb.log_dir).parent == tmp_path / "tensorboard"


@pytest.mark.parametrize("fragment, logger", [("tensorboard", "TensorBoardLogger"), ("wandb", "WandbLogger")])
def test_logger_fragments_parse(fragment, logger, tmp_path: Path, capsys) -> None:
    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(root / "demo.yaml"), "--config", str(root / "loggers" / f"{fragment}.yaml"),
              "--data.eval_sets=null", "--print_config"])
    assert err.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    names = [entry["class_path"].rsplit(".", 1)[1] for entry in printed["trainer"]["logger"]]
    assert names == ["CSVLogger", logger]
    if fragment == "wandb":
        assert printed["trainer"]["logger"][1]["init_args"]["offline"] is True
