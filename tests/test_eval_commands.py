"""The retrieval / embed / compose / report subcommands end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_eval_support import image, tiny_export, write_caption_shards
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.eval.commands import COMMANDS
from dualenc.eval.encode import encode_images, encode_texts, eval_batches, flatten_captions
from dualenc.eval.report import read_csv_metric, result_record, write_results
from dualenc.eval.retrieval import retrieval_metrics
from dualenc.eval.topk_recall import retrieval_report
from dualenc.export import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[str]]]:
    root = tmp_path_factory.mktemp("cmd")
    caps = write_caption_shards(root / "caps", n=10, shard_size=4)
    return root, tiny_export(root), caps


def test_retrieval_cli_matches_library_and_embedding_dirs(setup, capsys: pytest.CaptureFixture[str]) -> None:
    root, export, caps = setup
    out = root / "ret"
    assert COMMANDS["retrieval"](["--model", str(export), "--data", str(root / "caps"), "--workers", "0",
                                  "--image-chunk", "3", "--text-chunk", "4", "--json", str(out / "r.json"),
                                  "--plots", str(out)]) == 0
    assert "retrieval on caps (10 images, 19 captions)" in capsys.readouterr().out
    rec = json.loads((out / "r.json").read_text())
    assert rec["task"] == "zeroshot_retrieval" and rec["metrics"]["texts"] == sum(len(c) for c in caps)
    assert (out / "caps_recall_at_k.png").is_file() and (out / "caps_similarity.png").is_file()
    # Same numbers as the library on the same embeddings.
    model = load_model(export)
    enc = encode_images(model, eval_batches(str(root / "caps"), model.image_tower.data_config, 4, 0, labels=False,
                                            captions=True), captions=True)
    assert enc.captions == caps
    texts, owner = flatten_captions(enc.captions)
    txt = encode_texts(model, model.text_tower.tokenizer_fn(), texts)
    ref = retrieval_report(enc.embeddings, txt, owner)[0]  # CLIP_benchmark's tie convention, the default
    assert rec["metrics"] == pytest.approx(ref)
    assert rec["ties"] == "clip_benchmark" and "torch.topk" in rec["ties_convention"]
    # The captions repeat ("a red square" belongs to three images): the exact bounds are reported.
    bounds = rec["details"]["recall_bounds"]
    opt = retrieval_metrics(enc.embeddings, txt, owner, ties="optimistic")
    assert bounds["text_retrieval_recall@1"][1] == pytest.approx(opt["text_retrieval_recall@1"])
    # Via embedding directories (ids KEY#j tie captions to images).
    for flag, name in (("--images", "ei"), ("--texts", "et")):
        assert COMMANDS["embed"](["--model", str(export), flag, str(root / "caps"), "--out", str(root / name),
                                  "--workers", "0"]) == 0
    assert COMMANDS["retrieval"](["--images", str(root / "ei"), "--texts", str(root / "et"),
                                  "--json", str(out / "e.json")]) == 0
    assert json.loads((out / "e.json").read_text())["metrics"] == pytest.approx(ref, abs=1e-6)
    assert COMMANDS["retrieval"](["--images", str(root / "ei"), "--texts", str(root / "et"), "--ties", "optimistic",
                                  "--json", str(out / "o.json")]) == 0
    assert json.loads((out / "o.json").read_text())["metrics"] == pytest.approx(opt, abs=1e-6)
    with pytest.raises(SystemExit):
        COMMANDS["retrieval"](["--images", str(root / "ei")])


def test_compose_cli(setup, capsys: pytest.CaptureFixture[str]) -> None:
    root, export, _ = setup
    COMMANDS["embed"](["--model", str(export), "--images", str(root / "caps"), "--out", str(root / "gal"),
                       "--workers", "0", "--format", "safetensors"])
    image("red", 0).save(root / "q.png")
    capsys.readouterr()
    assert COMMANDS["compose"](["--model", str(export), "--gallery", str(root / "gal"), "--image", str(root / "q.png"),
                                "--text", "blue", "--weight", "1.0", "--text", "red", "--weight", "-0.5", "-k", "3",
                                "--exclude", "c0001", "--json", str(root / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "+ 1*'blue' - 0.5*'red'" in printed
    hits = json.loads((root / "c.json").read_text())["neighbours"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and "c0001" not in [h["id"] for h in hits]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    # Check against a direct computation.
    from dualenc.eval.compose import composed_query
    from dualenc.eval.store import load_embeddings

    gal = load_embeddings(root / "gal")
    q = composed_query(load_model(export), root / "q.png", ["blue", "red"], [1.0, -0.5])
    scores = (q @ gal.tensor().T)[0]
    scores[gal.ids.index("c0001")] = -2
    assert [h["id"] for h in hits] == [gal.ids[i] for i in scores.topk(3).indices]
    # A gallery of another size is refused with both sizes named.
    from dualenc.eval.store import EmbeddingWriter

    w = EmbeddingWriter(root / "g8", "image", "x", "y")
    w.write("emb-00000", torch.zeros(2, 8), ["a", "b"])
    w.finish()
    with pytest.raises(ValueError, match="gallery .* has dim 8, model .* makes 16"):
        COMMANDS["compose"](["--model", str(export), "--gallery", str(root / "g8"), "--image", str(root / "q.png"),
                             "--text", "red"])


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,train/temperature\n"
                                          "0,0,4.0,0.07\n0,1,3.9,\n0,2,3.8,0.065\n")
    assert read_csv_metric(tmp_path / "metrics.csv") == ([0, 2], [0.07, 0.065])
    with pytest.raises(ValueError, match="no column 'train/x'"):
        read_csv_metric(tmp_path / "metrics.csv", "train/x")
    zs = result_record("toy", "m", "zeroshot_classification", {"top1": 0.5},
                       {"classnames": ["a", "b"], "per_class_recall": [1.0, 0.0]})
    rt = result_record("toy2", "m", "zeroshot_retrieval", {"image_retrieval_recall@1": 0.25},
                       {"recall_curves": {"image_retrieval": {"1": 0.25, "10": 0.9}}})
    write_results(tmp_path / "r.json", [zs, rt])
    assert COMMANDS["report"](["--results", str(tmp_path / "r.json"), "--metrics-csv", str(tmp_path / "metrics.csv"),
                               "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "toy [zeroshot_classification] m: top1=0.5" in out
    made = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert made == ["toy2_recall_at_k.png", "toy_per_class.png", "train_temperature.png"]
    from dualenc.eval.plots import plot_per_class

    plot_per_class([f"c{i}" for i in range(200)], [i / 200 for i in range(200)], tmp_path / "many.png")
    assert (tmp_path / "many.png").stat().st_size > 1000
