"""`dualenc align ...` end to end on embedding files (and embedding shards with a dualenc model)."""

from __future__ import annotations

import json

import pytest
import torch

from dualenc.plugins.commands import COMMANDS
from dualenc.plugins.embeddings import load_embeddings, save_embeddings
from dualenc.plugins.mapfile import ModelId
from dualenc.plugins.synthetic import planted_pair

align = COMMANDS["align"]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def files(tmp_path):
    p = planted_pair(n=60, d_source=8, seed=0)
    keys = [f"k{i:03d}" for i in range(60)]
    a = save_embeddings(tmp_path / "a.safetensors", {"image": p.source_image, "text": p.source_text},
                        ModelId("model-a", 8, "aaaa"), keys)
    b = save_embeddings(tmp_path / "b.safetensors", {"image": p.target_image, "text": p.target_text},
                        ModelId("model-b", 8, "bbbb"), keys)
    c = save_embeddings(tmp_path / "c.safetensors", {"image": p.source_image}, ModelId("model-c", 8, "cccc"), keys)
    return p, a, b, c, tmp_path


def test_fit_apply_eval(files, capsys):
    p, a, b, c, tmp = files
    assert align(["fit", "--method", "procrustes", "--source", str(a), "--target", str(b),
                  "--out", str(tmp / "a2b.safetensors")]) == 0
    assert "fitted procrustes map model-a -> model-b on 60 anchors" in capsys.readouterr().out
    assert align(["apply", "--map", str(tmp / "a2b.safetensors"), "--input", str(a),
                  "--out", str(tmp / "mapped.safetensors")]) == 0
    mapped = load_embeddings(tmp / "mapped.safetensors")
    assert mapped.keys[:2] == ["k000", "k001"] and mapped.model.fingerprint is None
    torch.testing.assert_close(mapped.arrays["text"].double(), p.target_text, atol=1e-5, rtol=0)
    assert align(["apply", "--map", str(tmp / "a2b.safetensors"), "--input", str(a), "--modality", "image",
                  "--out", str(tmp / "mapped.npy")]) == 0
    assert load_embeddings(tmp / "mapped.npy").arrays["embeddings"].shape == (60, 8)
    capsys.readouterr()
    assert align(["eval", "--map", str(tmp / "a2b.safetensors"), "--source", str(a), "--target", str(b),
                  "--json", str(tmp / "m.json")]) == 0
    report = json.loads((tmp / "m.json").read_text())
    assert report["a2b/image/mean_cosine"] == pytest.approx(1.0) and report["b2a/text/top1"] == 1.0
    assert report["a2b/text->image/R@10"] == pytest.approx(report["b/text->image/R@10"])


def test_wrong_model_and_bad_input_fail_clearly(files, capsys):
    p, a, b, c, tmp = files
    align(["fit", "--method", "procrustes", "--source", str(a), "--target", str(b),
           "--out", str(tmp / "m.safetensors")])
    capsys.readouterr()
    assert align(["apply", "--map", str(tmp / "m.safetensors"), "--input", str(c), "--out", str(tmp / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "fitted for source 'model-a'" in err and "'model-c'" in err and not (tmp / "x.npy").exists()
    assert align(["eval", "--map", str(tmp / "m.safetensors"), "--source", str(a), "--target", str(c)]) == 2
    assert "target" in capsys.readouterr().err
    short = save_embeddings(tmp / "short.safetensors", {"image": p.target_image[:50]}, ModelId("model-b", 8, "bbbb"))
    assert align(["fit", "--method", "procrustes", "--source", str(a), "--target", str(short),
                  "--out", str(tmp / "y.safetensors")]) == 2
    assert "anchor counts differ" in capsys.readouterr().err
    assert align(["fit", "--method", "procrustes", "--source", str(a), "--target", str(b), "--on-few-anchors",
                  "error", "--args", '{"use_scipy": false}', "--out", str(tmp / "y.safetensors")]) == 0
    assert align(["fit", "--method", "learned_q", "--source", str(a), "--out", str(tmp / "z.safetensors")]) == 2
    assert "training plugin" in capsys.readouterr().err
    assert align(["fit", "--method", "procrustez", "--source", str(a), "--out", str(tmp / "z.safetensors")]) == 2
    assert "Did you mean 'procrustes'" in capsys.readouterr().err
    assert align(["fit", "--method", "whitening", "--source", str(a), "--args", "[1]",
                  "--out", str(tmp / "w.safetensors")]) == 2  # a user error: one line, exit 2
    assert "--args must be a JSON object, got list" in capsys.readouterr().err


def test_other_methods_and_list(files, capsys):
    p, a, b, c, tmp = files
    assert align(["fit", "--method", "whitening", "--source", str(a), "--args", '{"k": 4}',
                  "--out", str(tmp / "w.safetensors")]) == 0
    assert align(["apply", "--map", str(tmp / "w.safetensors"), "--input", str(a), "--modality", "image",
                  "--out", str(tmp / "w.npy")]) == 0
    assert load_embeddings(tmp / "w.npy").arrays["embeddings"].shape == (60, 4)
    assert align(["fit", "--method", "mnn_procrustes", "--source", str(a), "--target", str(b),
                  "--out", str(tmp / "mnn.safetensors")]) == 0
    assert align(["fit", "--method", "vec2vec", "--source", str(a), "--target", str(b), "--args",
                  '{"steps": 2, "batch_size": 8, "latent_dim": 8, "hidden_dim": 16}',
                  "--out", str(tmp / "v.safetensors")]) == 0
    assert align(["eval", "--map", str(tmp / "v.safetensors"), "--source", str(a), "--target", str(b)]) == 0
    capsys.readouterr()
    assert align(["list"]) == 0
    out = capsys.readouterr().out
    assert "vec2vec" in out and "hf_clip" in out


def test_embed_texts_and_shards_with_a_dualenc_model(tiny_model, tmp_path, capsys):
    from PIL import Image

    from dualenc.data_tools.writer import ShardWriter
    from dualenc.export import export_model

    path = export_model(tiny_model, tmp_path / "export")
    (tmp_path / "texts.txt").write_text("a photo of a dog\n\na red square\n")
    args = ["--target", "dualenc", "--target-args", json.dumps({"path": str(path)}), "--cpu", "--workers", "0"]
    assert align(["embed", *args, "--texts", str(tmp_path / "texts.txt"),
                  "--out", str(tmp_path / "t.safetensors")]) == 0
    t = load_embeddings(tmp_path / "t.safetensors")
    assert t.arrays["text"].shape == (2, 16) and t.model.name.startswith("dualenc:") and t.model.fingerprint
    with ShardWriter(tmp_path / "shards", max_count=3) as w:
        for i, color in enumerate(["red", "green", "blue", "white"]):
            w.write(f"s{i}", Image.new("RGB", (40, 40), color), f"a {color} image")
    assert align(["embed", *args, "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "s.safetensors")]) == 0
    s = load_embeddings(tmp_path / "s.safetensors")
    assert s.arrays["image"].shape == s.arrays["text"].shape == (4, 16) and sorted(s.keys) == ["s0", "s1", "s2", "s3"]
    assert s.model.fingerprint == t.model.fingerprint
    with torch.no_grad():
        i = s.keys.index("s2")
        tok = tiny_model.text_tower.tokenizer_fn()(["a blue image"])
        expected = tiny_model.eval().encode_text(tok["input_ids"], tok["attention_mask"])[0]
    torch.testing.assert_close(s.arrays["text"][i], expected, atol=1e-5, rtol=0)
    assert align(["embed", *args, "--out", str(tmp_path / "n.safetensors")]) == 2
