"""CLIP_benchmark's published webdataset layout, and parity with CLIP_benchmark's own metric code.

The fixture writes the layout the way ``clip_benchmark.webdataset_builder.convert_dataset`` does
(webdataset's ShardWriter, ``root/<split>/%d.tar``, keys ``s%07d``, lossless webp, ``.cls`` ints,
``nshards.txt``, the two list files in ``root/``), and CLIP_benchmark's own builder reads it back. The
metric parity tests call the real ``clip_benchmark`` package (a dev dependency) on the same embeddings.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_eval_support import COLORS, TEMPLATES, image, tiny_export
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.errors import UserError
from dualenc.eval.commands import COMMANDS
from dualenc.eval.encode import encode_images, encode_texts, eval_batches, flatten_captions
from dualenc.eval.layout import benchmark_split, is_benchmark_root
from dualenc.eval.topk_recall import clip_benchmark_recall, retrieval_report
from dualenc.export import load_model

NAMES = list(COLORS)


def _bytes(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **({"format": "webp", "lossless": True} if fmt == "webp" else {"format": fmt.replace("jpg", "jpeg")}))
    return buf.getvalue()


def write_benchmark(root: Path, split: str, n: int, fmt: str = "webp", retrieval: bool = False,
                    max_count: int = 1, lists: bool = True) -> list:
    """One split as convert_dataset / convert_retrieval_dataset write it; returns labels or captions."""
    import webdataset

    (root / split).mkdir(parents=True, exist_ok=True)
    out = []
    sink = webdataset.ShardWriter(str(root / split / "%d.tar"), maxcount=max_count, verbose=0)
    for i in range(n):
        c = i % len(NAMES)
        sample = {"__key__": "s%07d" % i, fmt: _bytes(image(NAMES[c], i), fmt)}
        if retrieval:  # duplicate captions across images, as web data has them
            caps = [f"a {NAMES[c]} square", f"square {i}"][: 1 + i % 2]
            sample["txt"] = "\n".join(caps)
            out.append(caps)
        else:
            sample["cls"] = c
            out.append(c)
        sink.write(sample)
    shards = sink.shard
    sink.close()
    (root / split / "nshards.txt").write_text(f"{shards}\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    elif lists:
        (root / "classnames.txt").write_text("\n".join(f"{n} square" for n in NAMES) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cb")
    labels = write_benchmark(root / "wds_colors", "test", 12, "webp")  # 12 shards: 10.tar sorts after 9.tar
    write_benchmark(root / "wds_colors", "train", 8, "png", max_count=3)
    caps = write_benchmark(root / "wds_caps", "test", 11, "jpg", retrieval=True, max_count=4)
    return root, tiny_export(root), labels, caps


def test_layout_is_read_as_published(setup) -> None:
    root, _, labels, _ = setup
    ds = root / "wds_colors"
    assert is_benchmark_root(ds) and not is_benchmark_root(ds / "test")
    split = benchmark_split(ds, "test")
    assert [Path(s).name for s in split.shards] == [f"{i}.tar" for i in range(12)]  # numeric, as {0..11}.tar
    assert split.dataset_type == "classification" and benchmark_split(root / "wds_caps").dataset_type == "retrieval"
    # Our reader yields CLIP_benchmark's samples in CLIP_benchmark's order (its pipeline, run with webdataset).
    import webdataset as wds

    ref = wds.WebDataset(f"{ds}/test/{{0..11}}.tar", shardshuffle=False, nodesplitter=lambda s: s).decode(
        wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"])).to_tuple(
        ["webp", "png", "jpg", "jpeg"], "cls")
    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
           "crop_pct": 1.0}
    ours = [int(v) for b in eval_batches(str(ds), cfg, 5, 0) for v in b["label"]]
    assert ours == [int(c) for _, c in ref] == labels
    assert len([1 for b in eval_batches(str(ds), cfg, 5, 0, split="train") for _ in b["label"]]) == 8
    with pytest.raises(UserError, match="--split test"):
        benchmark_split(ds, "val")
    (root / "bad" / "test").mkdir(parents=True)
    (root / "bad" / "test" / "0.tar").write_bytes((ds / "test" / "0.tar").read_bytes())
    (root / "bad" / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(UserError, match="lacks 1.tar, 2.tar"):
        benchmark_split(root / "bad", "test")


def test_zeroshot_cli_on_benchmark_root(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, export, labels, _ = setup
    ds = root / "wds_colors"
    out = tmp_path / "r.json"
    assert COMMANDS["zeroshot"](["--model", str(export), "--data", str(ds), "--workers", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "class names: 4 from" in printed and f"templates: 2 from {ds / 'zeroshot_classification_templates.txt'}" \
        in printed
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    assert rec["dataset"] == "wds_colors" and m["samples"] == 12 and m["classes"] == 4
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(m) and m["acc5"] is None  # < 5 classes, as CLIP_benchmark
    assert rec["details"]["templates"] == TEMPLATES
    assert COMMANDS["zeroshot"](["--model", str(export), "--data", str(ds), "--split", "train", "--workers", "0",
                                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["samples"] == 8
    # No templates file: CLIP_benchmark fails ("Templates not specified"), so do we, naming the opt-in.
    bare = tmp_path / "bare"
    write_benchmark(bare, "test", 4, lists=False)
    (bare / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    with pytest.raises(UserError, match="--templates imagenet"):
        COMMANDS["zeroshot"](["--model", str(export), "--data", str(bare), "--workers", "0"])
    capsys.readouterr()
    assert COMMANDS["zeroshot"](["--model", str(export), "--data", str(bare), "--workers", "0", "--templates",
                                 "imagenet"]) == 0
    assert "templates: 80 from CLIP's ImageNet templates" in capsys.readouterr().out


def test_zeroshot_metrics_match_clip_benchmark(setup) -> None:
    """CLIP_benchmark's evaluate() on the same model and images gives our acc1/acc5/mean_per_class_recall."""
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from dualenc.eval.zeroshot import build_classifier, zeroshot_metrics

    root, export, _, _ = setup
    model = load_model(export)
    names = [f"{c} square" for c in COLORS] + ["purple square"]  # 5 classes, so acc5 exists; one is never a label
    cfg = model.image_tower.data_config
    batches = [(b["image"], b["label"]) for b in eval_batches(str(root / "wds_colors"), cfg, 5, 0)]
    tok = model.text_tower.tokenizer_fn()

    class Wrapped(torch.nn.Module):  # CLIP_benchmark's model interface over ours
        def encode_image(self, x):
            return model.encode_image(x)

        def encode_text(self, ids):
            return model.encode_text(ids, (ids != 0).long())

    # CLIP_benchmark's own classifier and logits; its accuracy() fails under numpy 2 (float() of a 1-element
    # array), so the scores are its formulas on its logits: top-k hits / n, and sklearn's balanced accuracy.
    from sklearn.metrics import balanced_accuracy_score

    clf = zsc.zero_shot_classifier(Wrapped(), lambda t: tok(t)["input_ids"], names, TEMPLATES, "cpu", amp=False)
    logits, target = zsc.run_classification(Wrapped(), clf, batches, "cpu", amp=False)
    top = logits.topk(5, 1).indices
    ref = {"acc1": float((top[:, :1] == target[:, None]).any(1).float().mean()),
           "acc5": float((top == target[:, None]).any(1).float().mean()),
           "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1))}
    enc = encode_images(model, eval_batches(str(root / "wds_colors"), cfg, 5, 0), labels=True)
    ours = zeroshot_metrics(enc.embeddings, enc.labels, build_classifier(model, tok, names, TEMPLATES))
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k


def _clip_benchmark_retrieval(img: torch.Tensor, txt: torch.Tensor, captions: list[list[str]], ks, batch: int = 4):
    """CLIP_benchmark's retrieval evaluate() on precomputed embeddings: its model/tokenizer see row indices."""
    zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    counter = iter(range(txt.shape[0]))

    class Rows(torch.nn.Module):
        def encode_image(self, rows):
            return img[rows]

        def encode_text(self, rows):
            return txt[rows]

    loader = [(torch.arange(i, min(i + batch, len(captions))), captions[i : i + batch])
              for i in range(0, len(captions), batch)]
    return zsr.evaluate(Rows(), loader, lambda texts: torch.tensor([next(counter) for _ in texts]), "cpu", amp=False,
                        recall_k_list=list(ks))


def test_retrieval_ties_match_clip_benchmark() -> None:
    """Duplicate captions tie exactly; the default convention is CLIP_benchmark's formula, to the last query."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    base = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    captions, rows = [], []
    for i in range(30):  # every image gets 1-3 captions drawn from 8 distinct texts: many exact duplicates
        mine = [int(v) for v in torch.randint(0, 8, (1 + i % 3,), generator=g)]
        captions.append([f"text {j}" for j in mine])
        rows += mine
    txt = base[rows]
    owner = torch.tensor([i for i, c in enumerate(captions) for _ in c])
    ks = (1, 5, 10)
    ref = _clip_benchmark_retrieval(img, txt, captions, ks)
    assert clip_benchmark_recall(img, txt, owner, ks) == pytest.approx(ref, abs=1e-6)  # its means are float32
    metrics, details = retrieval_report(img, txt, owner, ks)
    assert {k: metrics[k] for k in ref} == pytest.approx(ref, abs=1e-6)  # its means are float32
    assert details["ties"] == "clip_benchmark" and details["ties_changed_recall"]
    lo, hi = details["recall_bounds"]["text_retrieval_recall@1"]
    assert lo < hi  # the duplicates make image -> text R@1 a matter of tie-breaking
    opt, _ = retrieval_report(img, txt, owner, ks, ties="optimistic")
    assert opt["text_retrieval_recall@1"] == pytest.approx(hi)
    with pytest.raises(ValueError, match="ties must be one of"):
        retrieval_report(img, txt, owner, ks, ties="random")


def test_retrieval_cli_on_benchmark_root_matches_clip_benchmark(setup, tmp_path: Path) -> None:
    root, export, _, caps = setup
    ds = root / "wds_caps"
    out = tmp_path / "r.json"
    assert COMMANDS["retrieval"](["--model", str(export), "--data", str(ds), "--workers", "0", "--json", str(out),
                                  "--ks", "1", "5"]) == 0
    rec = json.loads(out.read_text())
    assert rec["ties"] == "clip_benchmark" and rec["metrics"]["images"] == 11
    model = load_model(export)
    enc = encode_images(model, eval_batches(str(ds), model.image_tower.data_config, 4, 0, labels=False,
                                            captions=True), captions=True)
    assert enc.captions == caps
    texts, _ = flatten_captions(enc.captions)
    txt = encode_texts(model, model.text_tower.tokenizer_fn(), texts)
    ref = _clip_benchmark_retrieval(enc.embeddings, txt, enc.captions, (1, 5))
    assert {k: rec["metrics"][k] for k in ref} == pytest.approx(ref, abs=1e-6)  # its means are float32


def test_eval_suite_reads_benchmark_roots(setup) -> None:
    """The training callback's sets take a CLIP_benchmark root and a split, like the CLI."""
    from dualenc.eval.suite import EvalSuite

    root, export, _, _ = setup
    suite = EvalSuite([{"name": "c", "data": str(root / "wds_colors"), "split": "train"}],
                      [{"name": "r", "data": str(root / "wds_caps"), "ks": [1]}], batch_size=4, num_workers=0)
    suite.check()
    out = suite.run(load_model(export))
    assert set(out) >= {"c/top1", "r/image_retrieval_recall@1"}
    zs, rt = suite.records
    assert zs["metrics"]["samples"] == 8 and rt["details"]["ties"] == "clip_benchmark"


def test_clip_benchmark_reads_the_fixture_as_we_do(setup, tmp_path: Path) -> None:
    """CLIP_benchmark's own builder reads the fixture: same labels in the same order, same lists; and without
    a templates file it fails, as dualenc does."""
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    root, _, labels, caps = setup
    ret = builder.build_dataset("wds/caps", root=str(root / "wds_caps"), split="test", task="zeroshot_retrieval")
    assert [c for _, c in ret] == caps  # our reader's captions are the same (test_retrieval_cli_on_benchmark_root)
    ds = builder.build_dataset("wds/colors", root=str(root / "wds_colors"), split="test",
                               task="zeroshot_classification")
    assert ds.classes == [f"{n} square" for n in NAMES] and ds.templates == TEMPLATES
    assert [int(c) for _, c in ds] == labels
    bare = tmp_path / "bare"
    write_benchmark(bare, "test", 2, lists=False)
    (bare / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    with pytest.raises(AssertionError, match="Templates not specified"):
        builder.build_dataset("wds/bare", root=str(bare), split="test", task="zeroshot_classification")


def test_clip_benchmark_aggregation_reads_our_results(setup, tmp_path: Path) -> None:
    """CLIP_benchmark's `build` step (results JSON files -> one CSV) takes dualenc's files as its own."""
    import argparse
    import csv

    cli = pytest.importorskip("clip_benchmark.cli")
    root, export, _, _ = setup
    assert COMMANDS["zeroshot"](["--model", str(export), "--data", str(root / "wds_colors"), "--workers", "0",
                                 "--json", str(tmp_path / "zs.json")]) == 0
    assert COMMANDS["retrieval"](["--model", str(export), "--data", str(root / "wds_caps"), "--workers", "0",
                                  "--json", str(tmp_path / "rt.json")]) == 0
    cli.main_build(argparse.Namespace(files=[str(tmp_path)], output=str(tmp_path / "benchmark.csv")))
    rows = {r["dataset"]: r for r in csv.DictReader(open(tmp_path / "benchmark.csv"))}
    zs, rt = json.loads((tmp_path / "zs.json").read_text()), json.loads((tmp_path / "rt.json").read_text())
    assert float(rows["wds_colors"]["acc1"]) == zs["metrics"]["acc1"]
    assert float(rows["wds_caps"]["image_retrieval_recall@5"]) == rt["metrics"]["image_retrieval_recall@5"]
    assert rows["wds_caps"]["task"] == "zeroshot_retrieval" and rows["wds_caps"]["ties"] == "clip_benchmark"
