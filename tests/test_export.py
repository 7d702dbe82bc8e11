"""export_model / load_model: safetensors + JSON config, self-contained, atomically replaced."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

from conftest import TINY_BERT, copy_tokenizer
from dualenc import export as export_mod
from dualenc.export import FORMAT, export_model, load_model
from dualenc.model import DualEncoder
from dualenc.towers import HFTextTower, TimmImageTower

pytestmark = pytest.mark.usefixtures("single_thread")


def _perturb(model: DualEncoder) -> None:
    """Move every parameter off its init so a fresh random model can never pass for the loaded one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(1.234)


def _assert_same_encodings(a: DualEncoder, b: DualEncoder, batch: dict) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(batch["image"]), b.encode_image(batch["image"]), rtol=0, atol=0)
        torch.testing.assert_close(a.encode_text(batch["input_ids"], batch["attention_mask"]),
                                   b.encode_text(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0)
        torch.testing.assert_close(a.scale(), b.scale())


def _leftovers(parent, name: str) -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}"))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(3, 3, 32, 32, generator=g)}


@pytest.mark.parametrize("bias", [None, -10.0])
def test_round_trip_is_self_contained(tmp_path, minilm_dir, batch, bias):
    tok_dir = copy_tokenizer(minilm_dir, tmp_path / "my_tokenizer")
    text = HFTextTower(config=dict(TINY_BERT), tokenizer=str(tok_dir), context_length=16, pooling="mean")
    model = DualEncoder(TimmImageTower("test_efficientnet", image_size=32), text, embed_dim=16,
                        init_logit_bias=bias)
    _perturb(model)
    texts = ["a photo of a dog", "a red square", "two cats"]
    batch.update(text.tokenizer_fn()(texts))

    out = export_model(model, tmp_path / "exports" / "m1")
    assert out == tmp_path / "exports" / "m1"
    assert {"config.json", "model.safetensors", "tokenizer"} <= set(os.listdir(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == FORMAT
    assert cfg["image_tower"]["name"] == "timm" and cfg["text_tower"]["name"] == "hf"
    assert cfg["text_tower"]["kwargs"]["tokenizer"] == "tokenizer"  # relative to the export
    assert str(tmp_path) not in (out / "config.json").read_text()  # no absolute paths leak in
    assert cfg["model"]["embed_dim"] == 16 and cfg["model"]["init_logit_bias"] == bias

    shutil.rmtree(tok_dir)  # the export must not depend on the original tokenizer directory
    loaded = load_model(out)
    assert not loaded.training
    assert isinstance(loaded.image_tower, TimmImageTower) and isinstance(loaded.text_tower, HFTextTower)
    assert loaded.text_tower.pooling == "mean" and loaded.text_tower.context_length == 16
    assert loaded.image_tower.data_config == model.image_tower.data_config
    assert (loaded.logit_bias is None) == (bias is None)
    # The saved tokenizer tokenizes exactly like the original one.
    relo = loaded.text_tower.tokenizer_fn()(texts)
    assert torch.equal(relo["input_ids"], batch["input_ids"])
    assert torch.equal(relo["attention_mask"], batch["attention_mask"])
    _assert_same_encodings(model, loaded, batch)
    assert _leftovers(out.parent, "m1") == []


def test_round_trip_pretrained_text_dir_and_vit(tmp_path, minilm_dir, batch):
    """A tower loaded from a pretrained directory exports as a config; the weights live in the export."""
    image = TimmImageTower("test_vit", image_size=32, model_kwargs={"img_size": 32})
    text = HFTextTower(model=minilm_dir, pooling="mean", context_length=12)
    model = DualEncoder(image, text, embed_dim=8)
    batch.update(text.tokenizer_fn()(["a photo of a dog", "a car", "snow"]))
    loaded = load_model(export_model(model, tmp_path / "minilm"))
    cfg = json.loads((tmp_path / "minilm" / "config.json").read_text())
    assert "model" not in cfg["text_tower"]["kwargs"]
    assert cfg["image_tower"]["kwargs"]["model_kwargs"] == {"img_size": 32}
    assert loaded.text_tower.output_dim == 384
    _assert_same_encodings(model, loaded, batch)


def test_round_trip_locked_model(tmp_path, tiny_model, tiny_batch):
    """A LiT-locked image tower (frozen BatchNorm, no num_batches_tracked) loads into a fresh one."""
    tiny_model.image_tower.lock(0)
    _perturb(tiny_model)
    loaded = load_model(export_model(tiny_model, tmp_path / "locked"))
    _assert_same_encodings(tiny_model, loaded, tiny_batch)


def test_existing_export_is_replaced(tmp_path, tiny_model, tiny_batch):
    out = tmp_path / "exp"
    export_model(tiny_model, out)
    (out / "stale.txt").write_text("from an older export")
    _perturb(tiny_model)
    export_model(tiny_model, out)
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["exp"]  # no temp or .old directories left behind
    _assert_same_encodings(tiny_model, load_model(out), tiny_batch)


def test_failed_export_keeps_previous_and_cleans_up(tmp_path, tiny_model, tiny_batch, monkeypatch):
    out = tmp_path / "exp"
    export_model(tiny_model, out)
    before = (out / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "save_file", boom)
    _perturb(tiny_model)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(tiny_model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["exp"]


def test_unregistered_tower_is_not_exported(tmp_path, tiny_model):
    class MyTower(TimmImageTower):
        pass

    tiny_model.image_tower.__class__ = MyTower
    with pytest.raises(KeyError, match="not registered"):
        export_model(tiny_model, tmp_path / "exp")
    assert os.listdir(tmp_path) == []


def test_stale_old_dir_does_not_block_export(tmp_path, tiny_model):
    out = tmp_path / "exp"
    export_model(tiny_model, out)
    (tmp_path / ".exp.old").mkdir()
    (tmp_path / ".exp.old" / "junk").write_text("x")
    export_model(tiny_model, out)
    assert (out / "model.safetensors").is_file()


def test_export_dir_respects_umask(tmp_path, tiny_model):
    umask = os.umask(0)
    os.umask(umask)
    out = export_model(tiny_model, tmp_path / "exp")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_load_dir_without_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a dualenc export") as err:
        load_model(tmp_path / "empty")
    assert "config.json" in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a dualenc export"):
        load_model(tmp_path / "does_not_exist")


def test_load_wrong_format(tmp_path, tiny_model):
    out = export_model(tiny_model, tmp_path / "exp")
    cfg = json.loads((out / "config.json").read_text())
    cfg["format"] = "open_clip/1"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format 'open_clip/1'"):
        load_model(out)


def test_load_rejects_weights_that_do_not_fit(tmp_path, tiny_model):
    out = export_model(tiny_model, tmp_path / "exp")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["embed_dim"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(out)
