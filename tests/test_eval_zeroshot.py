"""Zero-shot: shipped prompt lists, metrics from embeddings, image folders, the CLI, and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_eval_support import TEMPLATES, tiny_export, tiny_model, write_image_folder, write_labelled_shards
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.data.datamodule import eval_loader
from dualenc.eval.commands import COMMANDS
from dualenc.eval.encode import encode_images, eval_batches
from dualenc.eval.imagefolder import find_classes, folder_classnames, image_folder_loader
from dualenc.errors import UserError
from dualenc.eval.imagenet import imagenet_classnames, imagenet_templates, load_classnames, load_templates
from dualenc.eval.suite import resolve_prompts
from dualenc.eval.zeroshot import build_classifier, evaluate, zeroshot_metrics


def test_shipped_imagenet_lists() -> None:
    t = imagenet_templates()
    assert len(t) == 80 and len(set(t)) == 80 and all("{c}" in x for x in t)
    assert t[0] == "a bad photo of a {c}." and t[-1] == "a tattoo of the {c}."
    names = imagenet_classnames()
    assert len(names) == 1000
    assert (names[0], names[1], names[207], names[281], names[409], names[999]) == (
        "tench", "goldfish", "Golden Retriever", "tabby cat", "analog clock", "toilet paper")
    assert load_classnames("imagenet") == names and load_templates("imagenet") == t


def test_bad_prompt_files_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na photo of a thing.\n")
    with pytest.raises(ValueError, match=r"t\.txt.*\{c\}.*a photo of a thing"):
        load_templates(tmp_path / "t.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_classnames(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="imagenet"):
        load_classnames(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_metrics_from_embeddings_match_evaluate(tmp_path: Path, model) -> None:
    names = write_labelled_shards(tmp_path / "d", per_class=3, shard_size=5)
    cfg = model.image_tower.data_config
    clf = build_classifier(model, model.text_tower.tokenizer_fn(), names, TEMPLATES)
    ref = evaluate(model, eval_loader(str(tmp_path / "d"), cfg, 4, 0), clf)
    enc = encode_images(model, eval_batches(str(tmp_path / "d"), cfg, 4, 0), labels=True)
    got = zeroshot_metrics(enc.embeddings, enc.labels, clf, per_class=True, chunk=5)
    per_class = got.pop("per_class_recall")
    assert got == pytest.approx(ref)
    counts = torch.bincount(enc.labels, minlength=4).float()
    hits = torch.zeros(4).index_add_(0, enc.labels, ((enc.embeddings @ clf.T).argmax(1) == enc.labels).float())
    assert per_class == pytest.approx((hits / counts).tolist())
    with pytest.raises(ValueError, match="out of range"):
        zeroshot_metrics(enc.embeddings, enc.labels + 3, clf)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        zeroshot_metrics(enc.embeddings[:, :8], enc.labels, clf)
    with pytest.raises(ValueError, match="empty"):
        zeroshot_metrics(enc.embeddings[:0], enc.labels[:0], clf)


def test_image_folder(tmp_path: Path, model) -> None:
    root = tmp_path / "folder"
    names = write_image_folder(root, per_class=3)
    assert find_classes(root) == sorted(names) and folder_classnames(root) == sorted(names)
    cfg = model.image_tower.data_config
    parts = [image_folder_loader(root, cfg, 4, 0, rank=r, world=2) for r in range(2)]
    keys = [[k for b in p for k in b["key"]] for p in parts]
    assert not set(keys[0]) & set(keys[1]) and len(keys[0]) + len(keys[1]) == 12
    labels = [int(x) for b in image_folder_loader(root, cfg, 5, 0) for x in b["label"]]
    assert labels == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    # An unreadable file is skipped with a warning naming it; the rest is evaluated.
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = encode_images(model, image_folder_loader(root, cfg, 5, 0), labels=True)
    assert len(enc.keys) == 12 and enc.skipped == {"unreadable_image": 1}
    assert any("red/broken.jpg" in str(w.message) for w in caught)
    (root / "classnames.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="lists 2 class names but .* has 4 class folders"):
        folder_classnames(root)
    (root / "purple").mkdir()
    with pytest.raises(ValueError, match=r"\['purple'\] hold no image"):
        find_classes(root)
    (tmp_path / "none" / "a").mkdir(parents=True)
    (tmp_path / "none" / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="hold no image"):
        image_folder_loader(tmp_path / "none", cfg)


def test_empty_shards_are_a_clear_error(tmp_path: Path, model) -> None:
    from dualenc.data_tools.writer import ShardWriter

    with ShardWriter(tmp_path / "d", max_count=5) as w:
        w.write("x0", b"not an image", "caption", extra={"cls": 0})
    with pytest.raises(ValueError, match=r"evaluation set d is empty"):
        encode_images(model, eval_batches(str(tmp_path / "d"), model.image_tower.data_config, 4, 0), labels=True,
                      name="evaluation set d")


def test_resolve_prompts_defaults(tmp_path: Path) -> None:
    write_labelled_shards(tmp_path / "d", per_class=1, shard_size=5)
    names, temps = resolve_prompts(str(tmp_path / "d" / "shard-{00000..00000}.tar"), None, None)
    assert names[0] == "red square" and temps == TEMPLATES
    (tmp_path / "d" / "zeroshot_classification_templates.txt").unlink()
    # No silent fallback to CLIP's 80 templates: CLIP_benchmark fails without templates, and so do we.
    with pytest.raises(UserError, match="--templates imagenet"):
        resolve_prompts(str(tmp_path / "d"), None, None)
    assert resolve_prompts(str(tmp_path / "d"), None, "imagenet")[1] == imagenet_templates()
    (tmp_path / "d" / "classnames.txt").unlink()
    with pytest.raises(UserError, match="classnames.txt"):
        resolve_prompts(str(tmp_path / "d"), None, None)
    with pytest.raises(ValueError, match=r"\{c\}"):
        resolve_prompts(str(tmp_path / "d"), ["a"], ["no placeholder"])


def test_zeroshot_cli_shards_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tiny_export(tmp_path)
    write_labelled_shards(tmp_path / "d", per_class=2, shard_size=5)
    out = tmp_path / "out"
    assert COMMANDS["zeroshot"](["--model", str(export), "--data", str(tmp_path / "d"), "--workers", "0",
                                 "--json", str(out / "r.json"), "--plots", str(out)]) == 0
    assert "zero-shot top-1 on d:" in capsys.readouterr().out
    rec = json.loads((out / "r.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(rec)
    assert rec["task"] == "zeroshot_classification" and rec["metrics"]["samples"] == 8
    assert len(rec["details"]["per_class_recall"]) == 4
    assert (out / "d_per_class.png").stat().st_size > 1000 and (out / "d_similarity.png").is_file()
    write_image_folder(tmp_path / "f", per_class=2)
    assert COMMANDS["zeroshot"](["--model", str(export), "--data", str(tmp_path / "f"), "--workers", "0",
                                 "--templates", "imagenet"]) == 0
    assert "(4 classes" in capsys.readouterr().out
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match=r"bad\.txt"):
        COMMANDS["zeroshot"](["--model", str(export), "--data", str(tmp_path / "f"), "--templates",
                              str(tmp_path / "bad.txt")])
