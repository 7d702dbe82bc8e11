"""End to end through the `dualenc` CLI: fit on tiny demo shards, export, resume, zero-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dualenc.cli import main
from dualenc.export import load_model
from tests_helpers import tiny_config


def test_fit_export_resume_and_zeroshot(tmp_path: Path, demo_data: Path, capsys) -> None:
    cfg = tiny_config(tmp_path, demo_data, max_steps=4)
    main(["fit", "--config", str(cfg)])
    ckpt_dir = tmp_path / "ckpt"
    first = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 4
    export = tmp_path / "run" / "export"
    model = load_model(export)
    for k, v in model.state_dict().items():  # the export at fit end is the trained model
        torch.testing.assert_close(v, first["state_dict"][f"model.{k}"])

    # Resume: the optimizer, scheduler and step counter continue from the checkpoint.
    main(["fit", "--config", str(tiny_config(tmp_path, demo_data, max_steps=8)), "--ckpt_path", str(ckpt_dir / "last.ckpt")])
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
    cfg = tiny_config(tmp_path, demo_data, max_steps=1)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"__base__": str(cfg), "model": {"label_smoothingg": 0.1}}))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(typo)])
    assert "label_smoothingg" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran
