"""Every shipped config resolves its ``__base__`` chain and builds through the LightningCLI parser.

Big configs (EfficientNet-B7/ViT-B + BERT-base) are instantiated on the meta device: every constructor
runs (towers, DualEncoder, module, datamodule, trainer) without allocating weights. demo.yaml and a
real config with its towers swapped for tiny ones are instantiated for real and run a training step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import TINY_BERT
from dualenc.cli import BASE_KEY, expand_config_args, make_cli, resolve_config
from dualenc.losses import get_loss

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TOKENIZER_KEY = "model.model.text_tower.init_args.tokenizer"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when it is given args while sys.argv has some (pytest's).
    monkeypatch.setattr(sys, "argv", ["dualenc"])


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    """A real one-sample shard: enough for WebDataModule's construction-time pattern check.

    (Not an empty file: LightningCLI parses the data arguments with ``sub_configs=True``, so an
    existing file given for ``data.train`` is first tried as a YAML sub-config, and an empty one
    reads as ``null``.)
    """
    import io
    import tarfile

    path = tmp_path_factory.mktemp("shards") / "00000.tar"
    with tarfile.open(path, "w") as tar:
        data = b"a red square"
        info = tarfile.TarInfo("000000000.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return str(path)


def overrides(tokenizer: str, shard: str, root: Path) -> list[str]:
    """Point a config at local test files; keep the trainer on CPU and quiet."""
    return [f"--{TOKENIZER_KEY}={tokenizer}", f"--data.train={shard}", "--data.val=null", "--data.eval_sets=null",
            "--trainer.accelerator=cpu", "--trainer.logger=false",
            f"--trainer.default_root_dir={root}"]


def merged_chain(path: Path) -> dict[str, Any]:
    """The config as a user reads it: each file's keys deep-merged over its ``__base__``."""
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop(BASE_KEY, None)
    merged = merged_chain(path.parent / base) if base else {}

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(merged, data)


def contains(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Where ``expected`` (from the yaml) is not reflected in ``actual`` (the parsed config)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected a mapping, got {actual!r}"]
        errors = []
        for k, v in expected.items():
            if k in actual:
                errors += contains(actual[k], v, f"{where}.{k}")
            elif isinstance(actual.get("init_args"), dict) and k in actual["init_args"]:
                errors += contains(actual["init_args"][k], v, f"{where}.{k}")
            else:
                errors.append(f"{where}.{k}: missing from the parsed config")
        return errors
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return [f"{where}: {actual!r} != {expected!r}"]
        return [e for i, (a, x) in enumerate(zip(actual, expected)) for e in contains(a, x, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return [] if actual == pytest.approx(expected) else [f"{where}: {actual!r} != {expected!r}"]
    return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]


def test_configs_found():
    names = {p.name for p in CONFIGS}
    assert {"base.yaml", "demo.yaml", "align.yaml", "siglip.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_resolve_chain(path):
    chain = resolve_config(path)  # the root as a path, then overrides as YAML text without __base__
    for item in chain[1:]:
        assert BASE_KEY not in (yaml.safe_load(item) or {})
    data = yaml.safe_load(path.read_text()) or {}
    if BASE_KEY in data:
        assert len(chain) >= 2
        assert chain[0] == str((ROOT / "configs" / "base.yaml").resolve())  # every chain starts at base.yaml
        data.pop(BASE_KEY)
        assert yaml.safe_load(chain[-1]) == data
    else:
        assert chain == [str(path.resolve())]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_on_meta_device(path, tokenizer_dir, shard, tmp_path):
    args = ["--config", str(path), *overrides(tokenizer_dir, shard, tmp_path)]
    with torch.device("meta"):
        cli = make_cli(args, run=False)

    # Everything the files say arrived in the parsed config (including what came from __base__).
    expected = merged_chain(path)
    expected["model"]["model"]["text_tower"]["init_args"]["tokenizer"] = tokenizer_dir
    expected["data"]["train"], expected["data"]["val"] = shard, None
    expected["data"].pop("eval_sets", None)  # overridden: demo.yaml's set is relative to the working directory
    expected["trainer"].update(accelerator="cpu", logger=False, default_root_dir=str(tmp_path))
    problems = contains(cli.config.as_dict(), expected)
    assert not problems, "\n".join(problems)

    module, model = cli.model, cli.model.model
    assert next(model.parameters()).device.type == "meta"
    assert module.loss_name == expected["model"].get("loss", "contrastive")
    spec = get_loss(module.loss_name)
    assert (model.logit_bias is not None) == spec.uses_bias
    tower_cfg = expected["model"]["model"]["image_tower"]["init_args"]
    assert model.image_tower.trunk.default_cfg["architecture"] == tower_cfg["model_name"]
    size = tower_cfg.get("image_size") or model.image_tower.data_config["input_size"][-1]
    assert model.image_tower.data_config["input_size"] == (3, size, size)
    with torch.device("meta"):
        emb = model.encode_image(torch.empty(2, 3, size, size))
    assert emb.shape == (2, model.embed_dim) == (2, expected["model"]["model"].get("embed_dim", 640))
    text_cfg = expected["model"]["model"]["text_tower"]["init_args"]["config"]
    assert model.text_tower.output_dim == text_cfg["hidden_size"]
    assert model.text_tower.encoder.config.num_hidden_layers == text_cfg["num_hidden_layers"]
    assert model.text_tower.encoder.config.vocab_size == len(model.text_tower.tokenizer)
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor", "SamplesPerSecond", "ExportOnFitEnd"} <= callbacks
    assert cli.datamodule.batch_size == expected["data"]["batch_size"]


def test_align_config_values(tokenizer_dir, shard, tmp_path):
    """Spot-check the ALIGN recipe through two files (align.yaml over base.yaml)."""
    with torch.device("meta"):
        cli = make_cli(["--config", str(ROOT / "configs/align.yaml"), *overrides(tokenizer_dir, shard, tmp_path)],
                       run=False)
    tower = cli.model.model.image_tower
    assert tower.trunk.default_cfg["architecture"] == "efficientnet_b7" and tower.channels_last
    assert tower.data_config["input_size"] == (3, 289, 289)
    assert cli.model.label_smoothing == 0.1
    assert cli.model.model.embed_dim == 640
    assert cli.model.sched_cfg.decay == "linear" and cli.model.sched_cfg.warmup_steps == 10000
    assert cli.datamodule.aug["scale"] == (0.7, 1.0)
    assert cli.trainer.precision == "bf16-mixed"


def test_demo_config_instantiates_and_backprops(tokenizer_dir, shard, tmp_path):
    cli = make_cli(["--config", str(ROOT / "configs/demo.yaml"), *overrides(tokenizer_dir, shard, tmp_path)],
                   run=False)
    model = cli.model.model
    assert next(model.parameters()).device.type == "cpu"
    assert model.text_tower.pooling == "mean" and model.embed_dim == 128
    assert model.image_tower.data_config["input_size"] == (3, 48, 48)
    batch = {"image": torch.randn(4, 3, 48, 48),
             **model.text_tower.tokenizer_fn()(["a red circle", "a blue square", "a green star", "x"])}
    assert batch["input_ids"].shape == (4, 24)
    loss = cli.model._shared_step(batch, "train")
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    assert model.image_proj.weight.grad is not None and model.text_proj.weight.grad is not None


def tiny_overrides() -> list[str]:
    return ["--model.model.image_tower.init_args.model_name=test_efficientnet",
            "--model.model.image_tower.init_args.image_size=32",
            "--model.model.image_tower.init_args.channels_last=false",
            f"--model.model.text_tower.init_args.config={json.dumps(TINY_BERT)}",
            "--model.model.text_tower.init_args.context_length=16",
            "--model.model.embed_dim=16"]


def test_real_config_with_tiny_towers(tokenizer_dir, shard, tmp_path):
    """siglip.yaml -> effnet_b0_bert.yaml -> base.yaml, with command-line overrides making it tiny."""
    cli = make_cli(["--config", str(ROOT / "configs/siglip.yaml"), *overrides(tokenizer_dir, shard, tmp_path),
                    *tiny_overrides()], run=False)
    module, model = cli.model, cli.model.model
    assert module.loss_name == "siglip"
    assert model.logit_bias is not None and model.logit_bias.item() == -10.0
    assert model.scale().item() == pytest.approx(10.0, rel=1e-5)
    assert model.image_tower.trunk.default_cfg["architecture"] == "test_efficientnet"
    assert model.text_tower.encoder.config.hidden_size == 32 and model.embed_dim == 16
    batch = {"image": torch.randn(4, 3, 32, 32), **model.text_tower.tokenizer_fn()(["a", "b c", "d e f", "g"])}
    loss = module._shared_step(batch, "train")
    assert torch.isfinite(loss)


def test_dict_options_are_replaced_not_merged(tokenizer_dir, shard, tmp_path):
    """A derived config that sets one field of the HF text ``config`` dict replaces the whole dict.

    This is jsonargparse's semantics for dict-typed values: config authors must repeat the full
    dict (as demo.yaml does). The error then comes from the tower, naming ``model_type``.
    """
    cfg = tmp_path / "partial.yaml"
    cfg.write_text(yaml.safe_dump({BASE_KEY: str(ROOT / "configs/demo.yaml"),
                                   "model": {"model": {"text_tower": {"init_args": {"config": {"hidden_size": 64}}}}}}))
    with torch.device("meta"):
        with pytest.raises(ValueError, match="model_type"):
            make_cli(["--config", str(cfg), *overrides(tokenizer_dir, shard, tmp_path)], run=False)


def test_typo_fails_naming_the_key(tmp_path, tokenizer_dir, shard, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(f"{BASE_KEY}: {ROOT / 'configs/demo.yaml'}\nmodel:\n  lrr: 0.1\n")
    with pytest.raises(SystemExit) as err:
        make_cli(["--config", str(cfg), *overrides(tokenizer_dir, shard, tmp_path)], run=False)
    assert err.value.code != 0
    assert "lrr" in capsys.readouterr().err


def test_nested_typo_fails_naming_the_key(tmp_path, tokenizer_dir, shard, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(yaml.safe_dump({BASE_KEY: str(ROOT / "configs/demo.yaml"),
                                   "model": {"model": {"image_tower": {"init_args": {"imagesize": 64}}}}}))
    with pytest.raises(SystemExit):
        make_cli(["--config", str(cfg), *overrides(tokenizer_dir, shard, tmp_path)], run=False)
    assert "imagesize" in capsys.readouterr().err


def test_missing_shards_fail_at_construction(tokenizer_dir, tmp_path):
    with torch.device("meta"), pytest.raises(FileNotFoundError, match="matches no file"):
        make_cli(["--config", str(ROOT / "configs/effnet_b0_bert.yaml"),
                  *overrides(tokenizer_dir, str(tmp_path / "nope/{00000..00003}.tar"), tmp_path)], run=False)


# ---- __base__ resolution -------------------------------------------------------------------


def test_base_relative_to_file_and_override_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("a: 1\nb: {c: 2, d: 3}\n")
    (tmp_path / "sub" / "mid.yaml").write_text(f"{BASE_KEY}: ../root.yaml\nb: {{c: 20}}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text(f"{BASE_KEY}: mid.yaml\na: 100\n")
    chain = resolve_config(tmp_path / "sub" / "leaf.yaml")
    assert len(chain) == 3 and chain[0] == str((tmp_path / "root.yaml").resolve())
    docs = [yaml.safe_load(Path(chain[0]).read_text())] + [yaml.safe_load(t) for t in chain[1:]]
    assert docs == [{"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 20}}, {"a": 100}]


def test_base_cycle_raises(tmp_path):
    (tmp_path / "a.yaml").write_text(f"{BASE_KEY}: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text(f"{BASE_KEY}: a.yaml\ny: 1\n")
    with pytest.raises(ValueError, match="cycle"):
        resolve_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text(f"{BASE_KEY}: self.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        resolve_config(tmp_path / "self.yaml")


def test_missing_base_raises(tmp_path):
    (tmp_path / "a.yaml").write_text(f"{BASE_KEY}: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        resolve_config(tmp_path / "a.yaml")


def test_expand_config_args_forms(tmp_path):
    (tmp_path / "base.yaml").write_text("a: 1\n")
    (tmp_path / "top.yaml").write_text(f"{BASE_KEY}: base.yaml\nb: 2\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("c: 3\n")
    for form in (["--config", str(tmp_path / "top.yaml")], ["-c", str(tmp_path / "top.yaml")],
                 [f"--config={tmp_path / 'top.yaml'}"]):
        out = expand_config_args(["fit", *form, "--trainer.max_steps=3", "--config", str(plain)])
        assert out[0] == "fit" and out[1] == "--config" and out[2] == str((tmp_path / "base.yaml").resolve())
        assert out[3] == "--config" and yaml.safe_load(out[4]) == {"b": 2}
        assert out[5:] == ["--trainer.max_steps=3", "--config", str(plain.resolve())]
    assert expand_config_args(["fit", "--config"]) == ["fit", "--config"]  # left for the parser to reject


def test_resolved_temp_files_are_cleaned_up(tmp_path, monkeypatch, tokenizer_dir, shard):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with torch.device("meta"):
        make_cli(["--config", str(ROOT / "configs/siglip.yaml"), *overrides(tokenizer_dir, shard, tmp_path)],
                 run=False)
    assert list(scratch.iterdir()) == []
