"""DualEncoder(init_from=...): start fine-tuning from a dualenc export, an open_clip model, an HF dual encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_eval_support import minilm_dir
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.errors import UserError
from dualenc.export import export_model, load_model
from dualenc.interop.open_clip import WEIGHTS_FILE, export_open_clip
from dualenc.model import DualEncoder


def towers(seed: int, width: int = 32, pooling: str = "cls"):
    from dualenc.towers import HFTextTower, TimmImageTower

    torch.manual_seed(seed)
    text = HFTextTower(config=dict(model_type="bert", hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64), tokenizer=minilm_dir(), context_length=12, pooling=pooling)
    return TimmImageTower("test_efficientnet", image_size=32, crop_pct=1.0), text


def same(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DualEncoder]:
    root = tmp_path_factory.mktemp("pre")
    model = DualEncoder(*towers(0), embed_dim=16).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    export_model(model, root / "dualenc")
    export_open_clip(model, root / "open_clip")
    return root, model


@pytest.mark.parametrize("kind", ["dualenc", "open_clip", "open_clip_file"])
def test_init_from_copies_every_weight(source, kind: str) -> None:
    root, ref = source
    path = root / "open_clip" / WEIGHTS_FILE if kind == "open_clip_file" else root / kind
    fresh = DualEncoder(*towers(1), embed_dim=16)
    assert not same(fresh.state_dict(), ref.state_dict(), "image_tower.")
    model = DualEncoder(*towers(1), embed_dim=16, init_from=str(path))
    assert same(model.state_dict(), ref.state_dict())
    assert float(model.logit_scale.detach()) == 3.0


def test_init_from_an_open_clip_checkpoint_with_frozen_batch_norm(source, tmp_path: Path) -> None:
    """open_clip_train --lock-image --lock-image-freeze-bn-stats saves FrozenBatchNorm2d: no num_batches_tracked."""
    from safetensors.torch import load_file

    root, ref = source
    state = {k: v for k, v in load_file(str(root / "open_clip" / WEIGHTS_FILE)).items()
             if not k.endswith("num_batches_tracked")}
    assert len(state) < len(ref.state_dict())
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    model = DualEncoder(*towers(1), embed_dim=16, init_from=str(tmp_path / "epoch_3.pt"))
    assert same(model.state_dict(), ref.state_dict(), "image_tower.trunk.conv_stem")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    state.pop("visual.trunk.conv_stem.weight")  # any other missing weight still fails, naming it
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing keys: image_tower.trunk.conv_stem.weight"):
        DualEncoder(*towers(1), embed_dim=16, init_from=str(tmp_path / "bad.pt"))


def test_init_parts_and_mismatches(source, tmp_path: Path) -> None:
    root, ref = source
    fresh = DualEncoder(*towers(1), embed_dim=16).state_dict()
    model = DualEncoder(*towers(1), embed_dim=16, init_from=str(root / "open_clip"), init_parts=("text",))
    state = model.state_dict()
    assert same(state, ref.state_dict(), "text_tower.") and same(state, ref.state_dict(), "text_proj.")
    assert same(state, fresh, "image_tower.") and same(state, fresh, "image_proj.")
    with pytest.raises(ValueError, match="shape mismatch"):  # towers configured unlike the source
        DualEncoder(*towers(1, width=48), embed_dim=16, init_from=str(root / "open_clip"))
    with pytest.raises(UserError, match="init_parts"):
        DualEncoder(*towers(1), embed_dim=16, init_from=str(root / "dualenc"), init_parts=("audio",))
    # A SigLIP model from a softmax-trained source keeps its own bias init.
    siglip = DualEncoder(*towers(1), embed_dim=16, init_logit_bias=-10.0, init_from=str(root / "dualenc"))
    assert float(siglip.logit_bias.detach()) == -10.0 and same(siglip.state_dict(), ref.state_dict(), "text_tower.")
    # The export of a model started from pretrained weights needs the source no more.
    export_model(model, tmp_path / "ft")
    moved = tmp_path / "gone"
    shutil.copytree(root / "open_clip", moved)
    model2 = DualEncoder(*towers(1), embed_dim=16, init_from=str(moved))
    export_model(model2, tmp_path / "ft2")
    shutil.rmtree(moved)
    assert same(load_model(tmp_path / "ft2").state_dict(), model2.state_dict())


def test_init_text_from_an_hf_vision_text_dual_encoder(tmp_path: Path) -> None:
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(0)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=16),
        BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        projection_dim=16)
    hf = VisionTextDualEncoderModel(cfg).eval()
    hf.save_pretrained(tmp_path / "vtde")
    with pytest.raises(UserError, match="init_parts: \\[text\\]"):
        DualEncoder(*towers(1), embed_dim=16, init_from=str(tmp_path / "vtde"))
    model = DualEncoder(*towers(1), embed_dim=16, init_from=str(tmp_path / "vtde"), init_parts=("text",)).eval()
    assert torch.equal(model.text_proj.weight, hf.text_projection.weight)
    enc = model.text_tower.tokenizer_fn()(["a red square", "two dogs"])
    with torch.no_grad():
        ours = model.text_tower.encoder(**enc).last_hidden_state
        theirs = hf.text_model(**enc).last_hidden_state
    assert torch.equal(ours, theirs)


def test_init_from_in_a_training_config(tmp_path: Path, tokenizer_dir, monkeypatch) -> None:
    """`model.model.init_from` / `init_parts` in YAML (here as overrides of demo.yaml), through LightningCLI."""
    import io
    import sys
    import tarfile

    from dualenc.cli import make_cli

    monkeypatch.setattr(sys, "argv", ["dualenc"])
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:  # WebDataModule checks the pattern when it is built
        info = tarfile.TarInfo("000000000.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    root = Path(__file__).resolve().parents[1]
    args = ["--config", str(root / "configs/demo.yaml"),
            f"--model.model.text_tower.init_args.tokenizer={tokenizer_dir}",
            f"--data.train={shard}", "--data.val=null", "--data.eval_sets=null", "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}"]
    src = make_cli(args, run=False).model.model  # the config seeds everything with 0
    export_model(src, tmp_path / "pretrained")
    model = make_cli([*args, "--seed_everything=1", f"--model.model.init_from={tmp_path / 'pretrained'}",
                      "--model.model.init_parts=[text]"], run=False).model.model
    assert same(model.state_dict(), src.state_dict(), "text_tower.")
    assert not same(model.state_dict(), src.state_dict(), "image_proj.")


def test_sources_without_dualenc_towers_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from test_eval_models import hf_clip_dir

    with pytest.raises(UserError, match="'clip' cannot initialize"):  # CLIP's causal text model pools EOS
        DualEncoder(*towers(1), embed_dim=16, init_from=str(hf_clip_dir(tmp_path)))
    save_file({"visual.conv1.weight": torch.zeros(2, 3, 4, 4), "logit_scale": torch.zeros(())}, tmp_path / "vit.safetensors")
    with pytest.raises(UserError, match="its own vision transformer"):
        DualEncoder(*towers(1), embed_dim=16, init_from=str(tmp_path / "vit.safetensors"))
