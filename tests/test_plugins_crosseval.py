"""Cross-model evaluation through the CLI: ``dualenc retrieval/zeroshot --text-model --map`` and
``dualenc align eval`` (backward compatibility), checked against the library functions, plus a planted
case (model B is model A with rotated projections, the map is that rotation) where cross-model
numbers must equal single-model ones."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_eval_support import one_thread  # noqa: F401 - autouse fixture
from test_eval_support import tiny_model, write_caption_shards, write_labelled_shards

from dualenc.cli import main
from dualenc.eval.encode import encode_images, encode_texts, eval_batches, flatten_captions
from dualenc.eval.topk_recall import retrieval_report
from dualenc.eval.suite import resolve_prompts
from dualenc.eval.zeroshot import build_classifier, zeroshot_metrics
from dualenc.export import export_model, load_model
from dualenc.plugins import crossmodel
from dualenc.plugins.embeddings import load_embeddings
from dualenc.plugins.mapfile import MapMeta
from dualenc.plugins.maps import load_map
from dualenc.plugins.procrustes import OrthogonalMap
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.targets import DualencTarget


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross")
    write_caption_shards(root / "caps", n=12, shard_size=5)
    write_labelled_shards(root / "cls", per_class=3)
    a = export_model(tiny_model(0), root / "a")
    b = export_model(tiny_model(1), root / "b")
    rotated = tiny_model(0)  # A with its projections rotated: B's embeddings are A's times R^T, exactly
    r = random_orthogonal(16, 16, torch.Generator().manual_seed(3), torch.float32)
    with torch.no_grad():
        rotated.image_proj.weight.copy_(r @ rotated.image_proj.weight)
        rotated.text_proj.weight.copy_(r @ rotated.text_proj.weight)
    rot = export_model(rotated, root / "rot")
    # Maps A -> B and B -> A fitted through the CLI (few anchors: the map is poor, which is fine here).
    common = ["--cpu", "--workers", "0", "--shards", str(root / "caps")]
    for name, path in (("a", a), ("b", b)):
        assert main(["align", "embed", "--target", "dualenc", "--target-args", json.dumps({"path": str(path)}),
                     *common, "--out", str(root / f"{name}.safetensors")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 12 anchors for 16 dims: warned, and fine for this test
        for src, tgt in (("a", "b"), ("b", "a")):
            assert main(["align", "fit", "--method", "procrustes", "--source", str(root / f"{src}.safetensors"),
                         "--target", str(root / f"{tgt}.safetensors"),
                         "--out", str(root / f"{src}2{tgt}.safetensors")]) == 0
    ida, idr = DualencTarget(str(a)).identity(), DualencTarget(str(rot)).identity()
    zeros = torch.zeros(16, dtype=torch.float64)
    OrthogonalMap(r.double(), {f"{m}_{s}": zeros.clone() for m in ("image", "text") for s in ("source", "target")},
                  MapMeta(kind="procrustes", source=ida, target=idr, anchors=0)).save(root / "a2rot.safetensors")
    return {"root": root, "a": a, "b": b, "rot": rot}


def _retrieval(setup, *extra: str) -> dict:
    out = setup["root"] / f"r{abs(hash(extra))}.json"
    assert main(["retrieval", "--model", str(setup["a"]), "--data", str(setup["root"] / "caps"), "--workers", "0",
                 "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _zeroshot(setup, model: Path, *extra: str) -> dict:
    out = setup["root"] / f"z{abs(hash((model, extra)))}.json"
    assert main(["zeroshot", "--model", str(model), "--data", str(setup["root"] / "cls"), "--workers", "0",
                 "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _library_retrieval(setup, map_name: str) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same evaluation by hand: A's images, B's captions, the map applied to the side it moves."""
    root = setup["root"]
    ma, mb = load_model(setup["a"]), load_model(setup["b"])
    enc = encode_images(ma, eval_batches(str(root / "caps"), ma.image_tower.data_config, 4, 0, labels=False,
                                         captions=True), captions=True)
    texts, owner = flatten_captions(enc.captions)
    img, txt = enc.embeddings, encode_texts(mb, mb.text_tower.tokenizer_fn(), texts)
    m = load_map(root / map_name)
    if map_name == "a2b.safetensors":
        img = m.apply(img.double(), "image", normalize=True).float()
    else:
        txt = m.apply(txt.double(), "text", normalize=True).float()
    return retrieval_report(img, txt, owner)[0], img, txt, owner  # the CLI's default tie convention


@pytest.mark.parametrize("map_name,mapped", [("a2b.safetensors", "image"), ("b2a.safetensors", "text")])
def test_cross_model_retrieval_cli_matches_library(setup, map_name: str, mapped: str) -> None:
    rec = _retrieval(setup, "--text-model", str(setup["b"]), "--map", str(setup["root"] / map_name))
    assert rec["cross_model"]["mapped"] == mapped and rec["cross_model"]["text_model"] == str(setup["b"])
    assert rec["cross_model"]["map_kind"] == "procrustes" and "via" in rec["model"]
    ref, img, txt, owner = _library_retrieval(setup, map_name)
    assert rec["metrics"] == pytest.approx(ref, abs=1e-6)
    # The plugins' own metric (no ties between distinct images) agrees on text -> image search.
    cm = crossmodel.retrieval_metrics(txt, img, owner)
    assert rec["metrics"]["image_retrieval_recall@1"] == pytest.approx(cm["R@1"])
    assert rec["metrics"]["image_retrieval_recall@5"] == pytest.approx(cm["R@5"])


def test_cross_model_zeroshot_cli_matches_library(setup) -> None:
    root = setup["root"]
    rec = _zeroshot(setup, setup["a"], "--text-model", str(setup["b"]), "--map", str(root / "a2b.safetensors"))
    assert rec["cross_model"]["mapped"] == "image" and rec["task"] == "zeroshot_classification"
    ma, mb = load_model(setup["a"]), load_model(setup["b"])
    names, templates = resolve_prompts(str(root / "cls"), None, None)
    enc = encode_images(ma, eval_batches(str(root / "cls"), ma.image_tower.data_config, 4, 0, labels=True),
                        labels=True)
    img = load_map(root / "a2b.safetensors").apply(enc.embeddings.double(), "image", normalize=True).float()
    classifier = build_classifier(mb, mb.text_tower.tokenizer_fn(), names, templates).float()
    ref = zeroshot_metrics(img, enc.labels, classifier)
    assert {k: rec["metrics"][k] for k in ref} == pytest.approx(ref, abs=1e-6)
    assert rec["metrics"]["top1"] == pytest.approx(crossmodel.zero_shot_accuracy(img, enc.labels, classifier)["top1"])


def test_planted_exact_map_equals_single_model(setup) -> None:
    root, rot = setup["root"], str(setup["rot"])
    cross = _retrieval(setup, "--text-model", rot, "--map", str(root / "a2rot.safetensors"))
    same_a = _retrieval(setup)
    assert cross["metrics"] == pytest.approx(same_a["metrics"], abs=1e-6)
    for k, curve in same_a["details"]["recall_curves"].items():
        assert cross["details"]["recall_curves"][k] == pytest.approx(curve, abs=1e-6)
    zs_cross = _zeroshot(setup, setup["a"], "--text-model", rot, "--map", str(root / "a2rot.safetensors"))
    zs_rot = _zeroshot(setup, setup["rot"])
    assert zs_cross["metrics"] == pytest.approx(zs_rot["metrics"], abs=1e-6)
    assert zs_cross["details"]["per_class_recall"] == pytest.approx(zs_rot["details"]["per_class_recall"])
    # align eval on the shards: the exact map is backward compatible, new->old = old->old = new->new.
    out = root / "bc_planted.json"
    assert main(["align", "eval", "--map", str(root / "a2rot.safetensors"), "--source", str(setup["a"]),
                 "--target", rot, "--shards", str(root / "caps"), "--cpu", "--workers", "0",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["a2b/image/mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rep["a2b/text/mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    for d in ("text->image", "image->text"):
        assert rep[f"compat/{d}/compatible"] is True
        assert rep[f"compat/{d}/new_to_old"] == pytest.approx(rep[f"compat/{d}/old_to_old"], abs=1e-6)
        assert rep[f"compat/{d}/new_to_new"] == pytest.approx(rep[f"compat/{d}/old_to_old"], abs=1e-6)


def _flat(report: dict, prefix: str = "") -> dict:
    """A report with nested sections (e.g. the baseline rows) as one level of slash-joined keys."""
    out: dict = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_align_eval_backward_compatibility_matches_library(setup, capsys) -> None:
    root = setup["root"]
    args = ["align", "eval", "--map", str(root / "a2b.safetensors"), "--compat-metric", "R@5"]
    assert main([*args, "--source", str(root / "a.safetensors"), "--target", str(root / "b.safetensors"),
                 "--json", str(root / "bc_files.json")]) == 0
    assert main([*args, "--source", str(setup["a"]), "--target", str(setup["b"]), "--shards", str(root / "caps"),
                 "--cpu", "--workers", "0", "--json", str(root / "bc_shards.json")]) == 0
    files, shards = (_flat(json.loads((root / f"bc_{n}.json").read_text())) for n in ("files", "shards"))
    assert files == pytest.approx(shards, abs=1e-5)  # embedding on the fly = embedding files first
    new, old = load_embeddings(root / "a.safetensors"), load_embeddings(root / "b.safetensors")
    assert new.keys == old.keys
    m = load_map(root / "a2b.safetensors")
    a = {k: v.double() for k, v in new.arrays.items()}
    b = {k: v.double() for k, v in old.arrays.items()}
    bc = crossmodel.backward_compatibility(m.apply(a["text"], "text").float(), b["text"], b["image"], metric="R@5")
    assert files["compat/text->image/new_to_old"] == pytest.approx(bc["new_to_old"])
    assert files["compat/text->image/old_to_old"] == pytest.approx(bc["old_to_old"])
    assert files["compat/text->image/compatible"] == bc["compatible"] and files["compat/metric"] == "R@5"
    assert files["compat/image->text/new_to_new"] == pytest.approx(
        crossmodel.retrieval_metrics(a["image"], a["text"])["R@5"])
    # The cross-model numbers are cross_model_report's.
    ref = crossmodel.cross_model_report(a, b, lambda x, mod: m.apply(x, mod).float(),
                                        lambda x, mod: m.inverse().apply(x, mod).float())
    assert {k: files[k] for k in ref} == pytest.approx(ref)
    capsys.readouterr()
    assert main([*args, "--source", str(root / "a.safetensors"), "--target", str(setup["b"]),
                 "--shards", str(root / "caps"), "--cpu", "--workers", "0"]) == 2
    assert "export directories" in capsys.readouterr().err


def test_cross_model_bad_input(setup, capsys) -> None:
    root = setup["root"]
    # A user error through the CLI: one line, exit 2 (MapMismatchError is a ValueError).
    assert main(["retrieval", "--model", str(setup["a"]), "--data", str(root / "caps"), "--workers", "0",
                 "--text-model", str(setup["rot"]), "--map", str(root / "a2b.safetensors")]) == 2
    assert "not a map between" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --map without --text-model
        _retrieval(setup, "--map", str(root / "a2b.safetensors"))
    with pytest.raises(SystemExit):  # embedding directories take no map
        main(["retrieval", "--images", "x", "--texts", "y", "--map", str(root / "a2b.safetensors")])
