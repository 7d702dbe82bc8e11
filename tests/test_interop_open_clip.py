"""dualenc -> open_clip export, loaded by open_clip itself (no hub): same weights, embeddings, tokens, pixels.

Bit-identical, not just close: the open_clip model runs the very same modules (timm trunk, HF BERT,
bias-free linear projections) on the same weights, on the same CPU, so every float operation is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_support import minilm_dir, write_labelled_shards
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.cli import cmd_export
from dualenc.data.transforms import image_transform
from dualenc.errors import UserError
from dualenc.eval.commands import COMMANDS
from dualenc.export import export_model, load_model
from dualenc.interop.open_clip import (WEIGHTS_FILE, export_open_clip, from_open_clip_state_dict,
                                       to_open_clip_state_dict)
from dualenc.model import DualEncoder

open_clip = pytest.importorskip("open_clip")
TEXTS = ["a red square", "a photo of a small dog.", "x", "zebra zebra zebra zebra zebra zebra zebra zebra zebra"]


def tiny(pooling: str = "cls", crop_pct: float | None = 1.0, embed_dim: int | None = 16,
         bias: float | None = None, width: int = 32) -> DualEncoder:
    from dualenc.towers import HFTextTower, TimmImageTower

    torch.manual_seed(0)
    text = HFTextTower(config=dict(model_type="bert", hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64), tokenizer=minilm_dir(), context_length=12, pooling=pooling)
    img = TimmImageTower("test_efficientnet", image_size=48, crop_pct=crop_pct)
    return DualEncoder(img, text, embed_dim=embed_dim, init_logit_bias=bias).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_open_clip_loads_the_export_with_identical_embeddings(tmp_path: Path, pooling: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny(pooling, bias=-10.0 if pooling == "mean" else None)
    src = export_model(model, tmp_path / "export")
    assert json.loads((src / "config.json").read_text())["preprocess"]["crop_pct"] == 1.0
    assert cmd_export(["--model", str(src), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    out = tmp_path / "oc"
    assert f"local-dir:{out}" in capsys.readouterr().out
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    oc.eval()
    # Strict: the checkpoint has exactly the model's keys (load_checkpoint's strict=True would raise otherwise).
    assert open_clip.load_checkpoint(oc, str(out / WEIGHTS_FILE), strict=True) is not None
    assert type(oc).__name__ == "CustomTextCLIP"
    ours = load_model(src)
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), oc.encode_image(images, normalize=True))
        enc = ours.text_tower.tokenizer_fn()(TEXTS)
        ids = tokenizer(TEXTS)
        assert torch.equal(enc["input_ids"], ids)
        ours_text = ours.encode_text(enc["input_ids"], enc["attention_mask"])
        assert torch.equal(ours_text, oc.encode_text(ids, normalize=True))
        assert torch.equal(ours.logit_scale, oc.logit_scale)
        if pooling == "mean":
            assert torch.equal(ours.logit_bias, oc.logit_bias)
    # The same pixels: dualenc's eval transform and open_clip's preprocess on a non-square image.
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), "RGB")
    assert torch.allclose(image_transform(ours.image_tower.data_config, train=False)(pil), preprocess(pil), atol=1e-6)
    # The other way open_clip users load a model: register the config, point `pretrained` at the file.
    cfg = json.loads((out / "open_clip_config.json").read_text())
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "dualenc-tiny.json").write_text(json.dumps(cfg["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    oc2 = open_clip.create_model("dualenc-tiny", pretrained=str(out / WEIGHTS_FILE)).eval()
    with torch.no_grad():
        assert torch.equal(oc2.encode_image(images, normalize=True), oc.encode_image(images, normalize=True))


def test_state_dict_mapping_round_trips() -> None:
    model = tiny()
    state = model.state_dict()
    back = from_open_clip_state_dict(to_open_clip_state_dict(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(UserError, match="no counterpart"):
        to_open_clip_state_dict({"something.else": torch.zeros(1)})


def test_unexportable_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--allow-crop-change"):
        export_open_clip(tiny(crop_pct=None), tmp_path / "a")  # test_efficientnet's default crop_pct is 0.95
    assert not (tmp_path / "a").exists()
    export_open_clip(tiny(crop_pct=None), tmp_path / "a", allow_crop_change=True)
    assert json.loads((tmp_path / "a" / "open_clip_config.json").read_text())["dualenc"]["crop_pct"] == 0.95
    with pytest.raises(UserError, match="embed_dim"):
        export_open_clip(tiny(embed_dim=None, width=256), tmp_path / "b")  # test_efficientnet has 256 features


def test_zeroshot_on_the_open_clip_export_equals_the_dualenc_export(tmp_path: Path) -> None:
    """`dualenc zeroshot --model` runs open_clip's model (through the open_clip target) with our numbers."""
    model = tiny()
    export_model(model, tmp_path / "ours")
    export_open_clip(model, tmp_path / "oc")
    write_labelled_shards(tmp_path / "d", per_class=2, shard_size=5)
    results = {}
    for name in ("ours", "oc"):
        out = tmp_path / f"{name}.json"
        assert COMMANDS["zeroshot"](["--model", str(tmp_path / name), "--data", str(tmp_path / "d"), "--workers", "0",
                                     "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())["metrics"]
    assert results["oc"] == pytest.approx(results["ours"], abs=1e-6)
    # The checkpoint file with its config, as an open_clip user holds them.
    assert COMMANDS["zeroshot"](["--model", str(tmp_path / "oc" / WEIGHTS_FILE), "--model-config",
                                 str(tmp_path / "oc" / "open_clip_config.json"), "--data", str(tmp_path / "d"),
                                 "--workers", "0", "--json", str(tmp_path / "file.json")]) == 0
    assert json.loads((tmp_path / "file.json").read_text())["metrics"] == pytest.approx(results["ours"], abs=1e-6)
    for name in ("ours", "oc"):
        assert COMMANDS["retrieval"](["--model", str(tmp_path / name), "--data", str(tmp_path / "d"), "--workers", "0",
                                      "--json", str(tmp_path / f"r{name}.json")]) == 0
    assert json.loads((tmp_path / "roc.json").read_text())["metrics"] == pytest.approx(
        json.loads((tmp_path / "rours.json").read_text())["metrics"], abs=1e-6)


def test_preprocessing_travels_to_open_clip_and_back(tmp_path: Path) -> None:
    from dualenc.eval.models import load_eval_model
    from dualenc.towers import HFTextTower, TimmImageTower

    torch.manual_seed(0)
    text = HFTextTower(config=dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64), tokenizer=minilm_dir(), context_length=8)
    model = DualEncoder(TimmImageTower("test_efficientnet", image_size=40, crop_pct=1.0, interpolation="bilinear"),
                        text, embed_dim=8).eval()
    src = export_model(model, tmp_path / "export")
    pre = json.loads((src / "config.json").read_text())["preprocess"]
    assert pre["image_size"] == [40, 40] and pre["interpolation"] == "bilinear" and pre["crop_pct"] == 1.0
    assert load_model(src).image_tower.data_config["interpolation"] == "bilinear"
    out = export_open_clip(model, tmp_path / "oc")
    cfg = json.loads((out / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert cfg["size"] == 40 and cfg["interpolation"] == "bilinear" and cfg["mean"] == pre["mean"]
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert "bilinear" in str(preprocess)
    dc = load_eval_model(str(out)).image_tower.data_config  # dualenc evaluating the open_clip directory
    assert dc["interpolation"] == "bilinear" and tuple(dc["input_size"]) == (3, 40, 40)
