"""Each target kind loads offline from local files and embeds like the model it wraps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualenc.plugins import (DualencTarget, HFClipTarget, ModelId, OpenClipTarget, PrecomputedTarget, Target,
                             build_target)
from dualenc.plugins.embeddings import load_embeddings, save_embeddings

TEXTS = ["a photo of a dog", "a red square", "two cats"]


def check_embeddings(x: torch.Tensor, n: int, d: int) -> None:
    assert x.shape == (n, d) and x.dtype == torch.float32
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(n), atol=1e-5, rtol=0)


def check_frozen(t: Target) -> None:
    params = t.parameters()
    assert params and not any(p.requires_grad for p in params)
    assert all(not m.training for m in t._modules)


@pytest.fixture
def dualenc_export(tiny_model, tmp_path):
    from dualenc.export import export_model

    return export_model(tiny_model, tmp_path / "export"), tiny_model


def test_dualenc_target(dualenc_export, single_thread):
    path, model = dualenc_export
    t = build_target("dualenc", path=str(path))
    assert isinstance(t, DualencTarget) and t.embed_dim == 16 and t.image_size == 32
    check_frozen(t)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    img = t.encode_image(images)
    check_embeddings(img, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(img, model.eval().encode_image(images), atol=1e-5, rtol=1e-5)
        tok = model.text_tower.tokenizer_fn()(TEXTS)
        torch.testing.assert_close(t.encode_text(TEXTS), model.encode_text(tok["input_ids"], tok["attention_mask"]),
                                   atol=1e-5, rtol=1e-5)
    ident = t.identity()
    assert ident.dim == 16 and ident.fingerprint
    assert ident.fingerprint == build_target("dualenc", path=str(path)).fingerprint()
    with pytest.raises(TypeError, match="list of strings"):
        t.encode_text("one string")


def test_fingerprint_tells_models_apart(tiny_model, tmp_path):
    from dualenc.export import export_model

    a = build_target("dualenc", path=str(export_model(tiny_model, tmp_path / "a")))
    with torch.no_grad():
        tiny_model.image_proj.weight.add_(1e-3)
    b = build_target("dualenc", path=str(export_model(tiny_model, tmp_path / "b")))
    assert a.fingerprint() != b.fingerprint()


def test_adapt_images_converts_normalization_and_size():
    class Dummy(Target):
        image_size, image_mean, image_std = 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    t = Dummy()
    pixels = torch.rand(2, 3, 16, 16)
    src_mean, src_std = (0.1, 0.2, 0.3), (0.9, 0.8, 0.7)
    batch = (pixels - torch.tensor(src_mean).view(1, 3, 1, 1)) / torch.tensor(src_std).view(1, 3, 1, 1)
    out = t.adapt_images(batch, src_mean, src_std)
    expected = (F.interpolate(pixels, size=(8, 8), mode="bilinear", antialias=True) - 0.5) / 0.25
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert t.adapt_images(torch.zeros(1, 3, 8, 8)).shape == (1, 3, 8, 8)  # same size, no normalization given


OPEN_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def test_open_clip_target_offline(tmp_path, single_thread):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CLIP(**OPEN_CLIP_CFG).eval()
    ckpt = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    cfg = tmp_path / "open_clip_config.json"
    cfg.write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    t = build_target("open_clip", checkpoint=str(ckpt), model_config=str(cfg))
    assert isinstance(t, OpenClipTarget) and t.embed_dim == 16 and t.image_size == 32 and t.image_mean == (0.5,) * 3
    check_frozen(t)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.encode_image(images), F.normalize(model.encode_image(images), dim=-1),
                                   atol=1e-5, rtol=1e-5)
        ids = open_clip.tokenizer.SimpleTokenizer(context_length=16)(TEXTS)
        torch.testing.assert_close(t.encode_text(TEXTS), F.normalize(model.encode_text(ids), dim=-1),
                                   atol=1e-5, rtol=1e-5)
    plain_cfg = tmp_path / "plain.json"  # a bare model config works too
    plain_cfg.write_text(json.dumps(OPEN_CLIP_CFG))
    t2 = OpenClipTarget(str(ckpt), str(plain_cfg))
    assert t2.fingerprint() == t.fingerprint() and t2.image_mean != t.image_mean
    with pytest.raises(ValueError, match="neither a JSON config file nor a built-in"):
        OpenClipTarget(str(ckpt), "ViT-Nonexistent-1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenClipTarget(str(tmp_path / "missing.pt"), str(cfg))


def test_hf_clip_target_offline(tmp_path, minilm_dir, single_thread):
    from transformers import CLIPModel

    from tests_helpers import tiny_hf_clip_dir

    path = tiny_hf_clip_dir(tmp_path, minilm_dir)
    model = CLIPModel.from_pretrained(path).eval()
    t = build_target("hf_clip", path=str(path))
    assert isinstance(t, HFClipTarget) and t.embed_dim == 12 and t.image_size == 32 and t.context_length == 16
    check_frozen(t)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=images, **t.tokenizer(TEXTS[:2], padding="max_length", max_length=16,
                                                          truncation=True, return_tensors="pt"))
    torch.testing.assert_close(t.encode_image(images), out.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.encode_text(TEXTS[:2]), out.text_embeds, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        HFClipTarget("openai/clip-vit-base-patch32")


def test_precomputed_target(tmp_path):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    keys = [f"s{i}" for i in range(5)]
    path = save_embeddings(tmp_path / "emb.safetensors", {"image": img, "text": txt}, ModelId("teacher", 8, "beef"),
                           keys)
    t = build_target("precomputed", path=str(path))
    assert isinstance(t, PrecomputedTarget) and t.identity() == ModelId("teacher", 8, "beef")
    fi, ft = t.encode_batch({"image": torch.zeros(2, 3, 4, 4), "key": ["s3", "s0"], "text": ["x", "y"]})
    torch.testing.assert_close(fi, F.normalize(img[[3, 0]], dim=-1))
    torch.testing.assert_close(ft, F.normalize(txt[[3, 0]], dim=-1))
    check_embeddings(t.encode_text(["s1"]), 1, 8)
    with pytest.raises(KeyError, match="no embeddings for 1 key"):
        t.encode_image(["s9"])
    with pytest.raises(TypeError, match="by sample key"):
        t.encode_image(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="needs batch\\['key'\\]"):
        t.encode_batch({"image": torch.zeros(1, 3, 4, 4)})
    # .npy (image only) + a keys file; and .npz with keys inside.
    np.save(tmp_path / "img.npy", img.numpy())
    (tmp_path / "keys.txt").write_text("\n".join(keys))
    t2 = PrecomputedTarget(str(tmp_path / "img.npy"), keys=str(tmp_path / "keys.txt"), model="teacher-npy")
    torch.testing.assert_close(t2.encode_image(["s2"]), F.normalize(img[[2]], dim=-1))
    assert t2.name == "teacher-npy" and t2.fingerprint() is None
    np.savez(tmp_path / "e.npz", image=img.numpy(), text=txt.numpy(), keys=np.array(keys))
    t3 = PrecomputedTarget(str(tmp_path / "e.npz"))
    torch.testing.assert_close(t3.encode_text(["s4"]), F.normalize(txt[[4]], dim=-1))
    with pytest.raises(ValueError, match="no sample keys"):
        PrecomputedTarget(str(tmp_path / "img.npy"))


def test_embedding_file_checks(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3,), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D float"):
        load_embeddings(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_embeddings(tmp_path / "obj.npy")  # never unpickles
    with pytest.raises(ValueError, match="unknown embedding file type"):
        (tmp_path / "x.pt").write_bytes(b"")
        load_embeddings(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="3 keys"):
        save_embeddings(tmp_path / "k.safetensors", {"image": torch.zeros(2, 4)}, ModelId("m"), keys=["a", "b", "c"])
