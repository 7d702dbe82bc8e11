"""Evaluation subcommands of the ``dualenc`` CLI (each ``main(argv) -> exit code``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

import torch

from dualenc.clihelp import DefaultsParser
from dualenc.progress import sample_total


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(model_dir: str) -> Any:
    from dualenc.export import load_model

    return load_model(model_dir).to(_device())


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a dualenc export directory, an HF CLIP-style directory (CLIPModel "
                   "save_pretrained), or an open_clip checkpoint file (with --model-config)")
    p.add_argument("--model-kind", default="auto", help="auto (from the files), dualenc, hf_clip, open_clip, or "
                   "another target kind of `dualenc align`")
    p.add_argument("--model-config", help="for an open_clip checkpoint: its open_clip_config.json / model config "
                   "JSON, or a built-in open_clip architecture name")


def _load_any(a: argparse.Namespace, device: str) -> Any:
    from dualenc.eval.models import load_eval_model

    return load_eval_model(a.model, a.model_kind, a.model_config, device)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test", help="for a CLIP_benchmark root (root/{train,test}/*.tar): the split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--json", help="write the results (CLIP_benchmark-like JSON) to this file")
    p.add_argument("--plots", help="write PNG plots into this directory")
    p.add_argument("--name", default=None, help="dataset name for the output (default: the data folder's name)")


def _cross_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cross-model", "images embedded by --model, texts by --text-model, one side moved into "
                             "the other's space by --map (fitted with `dualenc align fit`; its metadata says which)")
    g.add_argument("--text-model", help="a second dualenc export that embeds the texts (with --map)")
    g.add_argument("--map", help="a map file between --model and --text-model, either direction")


def _cross(p: argparse.ArgumentParser, a: argparse.Namespace, device: str) -> Any:
    """The ``CrossModel`` of ``--text-model``/``--map``, or None for a single-model evaluation."""
    if not (a.text_model or a.map):
        return None
    if not (a.text_model and a.map and a.model):
        p.error("--text-model and --map go together, with --model (the image model)")
    from dualenc.plugins.crosseval import load_cross_model

    return load_cross_model(a.model, a.text_model, a.map, device)


def cmd_zeroshot(argv: list[str]) -> int:
    """dualenc zeroshot --model EXPORT_DIR --data SHARDS|IMAGE_FOLDER [--classnames F --templates F]
    [--text-model EXPORT_B --map MAP]"""
    from dualenc.eval.encode import FORMATS, encode_images, eval_batches
    from dualenc.eval.report import plot_record, result_record, write_results
    from dualenc.eval.suite import data_folder, prompt_sources
    from dualenc.eval.zeroshot import build_classifier, zeroshot_metrics

    p = DefaultsParser(prog="dualenc zeroshot", description="Zero-shot classification of labelled images: "
                       "shards in CLIP_benchmark's layout (.jpg + .cls, classnames.txt and "
                       "zeroshot_classification_templates.txt beside them; e.g. the demo's heldout/), "
                       "or an image folder (one subfolder per class).")
    _model_args(p)
    p.add_argument("--data", required=True, help="a CLIP_benchmark root (root/test/*.tar with classnames.txt and "
                   "zeroshot_classification_templates.txt in root/), a shard spec (directory, brace pattern, glob) "
                   "or an image folder")
    p.add_argument("--format", choices=FORMATS, default="auto", help="auto: a directory without .tar files is an "
                   "image folder")
    p.add_argument("--classnames", help="one class name per line, in label order, or 'imagenet' (default: "
                   "classnames.txt beside the shards, or an image folder's subfolder names)")
    p.add_argument("--templates", help="one template with {c} per line, or 'imagenet' for CLIP's 80 (default: "
                   "zeroshot_classification_templates.txt of the dataset; without one this fails, as CLIP_benchmark "
                   "does)")
    _data_args(p)
    _cross_args(p)
    a = p.parse_args(argv)
    if not a.model:
        p.error("--model is required")
    names, templates, names_src, templates_src = prompt_sources(a.data, a.classnames, a.templates, a.format)
    print(f"class names: {len(names)} from {names_src}; templates: {len(templates)} from {templates_src} "
          f"(e.g. {templates[0]!r})")
    device = _device()
    cross = _cross(p, a, device)
    model = cross.image_model if cross else _load_any(a, device)
    text_model = cross.text_model if cross else model
    name = a.name or data_folder(a.data).name
    batches = eval_batches(a.data, model.image_tower.data_config, a.batch_size, a.workers, labels=True, fmt=a.format,
                           split=a.split)
    enc = encode_images(model, batches, device, labels=True, name=f"evaluation set {a.data}", show_progress=True,
                        total=sample_total(a.data))
    img = cross.image(enc.embeddings) if cross else enc.embeddings
    classifier = build_classifier(text_model, text_model.text_tower.tokenizer_fn(), names, templates,
                                  device).float().cpu()
    if cross:
        classifier = cross.text(classifier)
    metrics = zeroshot_metrics(img, enc.labels, classifier, per_class=True)
    per_class = metrics.pop("per_class_recall")
    extra = {"cross_model": cross.setup} if cross else {}
    record = result_record(name, cross.name if cross else str(a.model), "zeroshot_classification", metrics,
                           {"classnames": names, "per_class_recall": per_class, "skipped": enc.skipped,
                            "templates": templates, "templates_source": templates_src,
                            "classnames_source": names_src}, **extra)
    if a.json:
        write_results(a.json, record)
    if a.plots:
        from dualenc.eval.plots import plot_similarity_heatmap

        made = plot_record(record, a.plots)
        rows = _one_per_class(enc.labels, 16)
        cls = enc.labels[rows]
        labels = [names[c] for c in cls]
        made.append(plot_similarity_heatmap(img[rows] @ classifier[cls].T,
                                            Path(a.plots) / f"{name}_similarity.png", labels, labels,
                                            title=f"{name}: images vs class prompts"))
        print("plots: " + ", ".join(str(m) for m in made))
    print(f"zero-shot top-1 on {name}: {metrics['top1']:.2f} ({len(names)} classes, "
          f"chance {1 / len(names):.2f})")
    return 0


def _one_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first image of up to ``n`` distinct classes (a readable heatmap sample)."""
    seen: dict[int, int] = {}
    for i, c in enumerate(labels.tolist()):
        if c not in seen:
            seen[c] = i
            if len(seen) == n:
                break
    return torch.tensor(sorted(seen.values()), dtype=torch.long)


def cmd_retrieval(argv: list[str]) -> int:
    """dualenc retrieval --model EXPORT --data SHARDS [--text-model EXPORT_B --map MAP]
    | --images EMB_DIR --texts EMB_DIR"""
    from dualenc.eval.encode import encode_images, encode_texts, eval_batches, flatten_captions
    from dualenc.eval.report import plot_record, result_record, write_results
    from dualenc.eval.retrieval import DEFAULT_IMAGE_CHUNK, DEFAULT_TEXT_CHUNK
    from dualenc.eval.suite import CURVE_KS, data_folder
    from dualenc.eval.topk_recall import DEFAULT_TIES, TIES, retrieval_report

    p = DefaultsParser(prog="dualenc retrieval", description="Image<->text retrieval: Recall@K, mean and "
                       "median rank. Images own every caption line of their caption member "
                       "(CLIP_benchmark's layout); ranks are exact, computed in bounded memory.")
    _model_args(p)
    p.add_argument("--data", help="image + caption shards, or a CLIP_benchmark retrieval root (root/test/*.tar)")
    p.add_argument("--caption-key", default="txt")
    p.add_argument("--images", help="instead of --model/--data: an image embeddings directory (dualenc embed)")
    p.add_argument("--texts", help="with --images: a text embeddings directory whose ids are IMAGE_ID#j")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--ties", choices=TIES, default=DEFAULT_TIES,
                   help="exactly tied scores (duplicate captions): clip_benchmark = Recall@K by CLIP_benchmark's "
                   "torch.topk formula (comparable with its results; the exact optimistic/pessimistic bounds are "
                   "reported beside it); optimistic/pessimistic = exact ranks with ties for/against the query")
    p.add_argument("--image-chunk", type=int, default=DEFAULT_IMAGE_CHUNK)
    p.add_argument("--text-chunk", type=int, default=DEFAULT_TEXT_CHUNK)
    _data_args(p)
    _cross_args(p)
    a = p.parse_args(argv)
    device = _device()
    cross = None
    if a.images or a.texts:
        if not (a.images and a.texts) or a.model or a.data or a.text_model or a.map:
            p.error("give --images and --texts (embedding directories), or --model and --data (optionally with "
                    "--text-model and --map), not a mix")
        img, txt, owner, image_ids, texts = _from_embedding_dirs(a.images, a.texts)
        model_name, name = f"{a.images} + {a.texts}", a.name or Path(a.images).name
    else:
        if not (a.model and a.data):
            p.error("give --model and --data (or --images and --texts)")
        cross = _cross(p, a, device)
        model = cross.image_model if cross else _load_any(a, device)
        text_model = cross.text_model if cross else model
        batches = eval_batches(a.data, model.image_tower.data_config, a.batch_size, a.workers, labels=False,
                               captions=True, caption_key=a.caption_key, split=a.split)
        enc = encode_images(model, batches, device, captions=True, name=f"evaluation set {a.data}",
                            show_progress=True, total=sample_total(a.data))
        texts, owner = flatten_captions(enc.captions or [])
        if not texts:
            raise ValueError(f"{a.data}: no caption found in the .{a.caption_key} members; retrieval needs captions")
        img, image_ids = enc.embeddings, enc.keys
        txt = encode_texts(text_model, text_model.text_tower.tokenizer_fn(), texts, device, a.batch_size,
                           show_progress=True)
        if cross:
            img, txt = cross.image(img), cross.text(txt)
        model_name, name = cross.name if cross else str(a.model), a.name or data_folder(a.data).name
    metrics, details = retrieval_report(img, txt, owner, a.ks, a.ties, a.image_chunk, a.text_chunk, device, CURVE_KS)
    extra = {"cross_model": cross.setup} if cross else {}
    convention = {"ties": details.pop("ties"), "ties_convention": details.pop("ties_convention")}
    record = result_record(name, model_name, "zeroshot_retrieval", metrics, details, **convention, **extra)
    if a.json:
        write_results(a.json, record)
    if a.plots:
        from dualenc.eval.plots import plot_similarity_heatmap

        made = plot_record(record, a.plots)
        first: dict[int, int] = {}
        for t, i in enumerate(owner.tolist()):
            first.setdefault(i, t)
        rows = sorted(first)[:16]
        cols = [first[i] for i in rows]
        made.append(plot_similarity_heatmap(img[rows] @ txt[cols].T, Path(a.plots) / f"{name}_similarity.png",
                                            [image_ids[i] for i in rows], [texts[t] for t in cols],
                                            title=f"{name}: images vs their first caption"))
        print("plots: " + ", ".join(str(m) for m in made))
    ks = ", ".join(f"R@{k} {metrics[f'image_retrieval_recall@{k}']:.3f}/{metrics[f'text_retrieval_recall@{k}']:.3f}"
                   for k in a.ks)
    print(f"retrieval on {name} ({metrics['images']} images, {metrics['texts']} captions), text->image/image->text: "
          f"{ks}; median rank {metrics['image_retrieval_median_rank']:g}/{metrics['text_retrieval_median_rank']:g}")
    if details.get("ties_changed_recall"):
        b = details["recall_bounds"]
        k = a.ks[0]
        print(f"note: exactly tied scores (e.g. duplicate captions) decide part of these recalls; with ties counted "
              f"against/for the query, R@{k} would be {b[f'image_retrieval_recall@{k}'][0]:.3f}-"
              f"{b[f'image_retrieval_recall@{k}'][1]:.3f} text->image, {b[f'text_retrieval_recall@{k}'][0]:.3f}-"
              f"{b[f'text_retrieval_recall@{k}'][1]:.3f} image->text (--ties)")
    return 0


def _from_embedding_dirs(images: str, texts: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str],
                                                             list[str]]:
    from dualenc.eval.store import load_embeddings

    img, txt = load_embeddings(images), load_embeddings(texts)
    if img.dim != txt.dim:
        raise ValueError(f"embedding sizes differ: {images} has dim {img.dim}, {texts} has {txt.dim}; "
                         "embed both with the same model")
    index = {k: i for i, k in enumerate(img.ids)}
    owner, missing = [], []
    for t in txt.ids:
        key = t.rsplit("#", 1)[0]
        if "#" not in t or key not in index:
            missing.append(t)
        else:
            owner.append(index[key])
    if missing:
        raise ValueError(f"{len(missing)} text id(s) name no image of {images}, e.g. {missing[:3]}; text ids must "
                         "be IMAGE_ID#j, as `dualenc embed --texts SHARDS` writes for the same shards")
    return img.tensor(), txt.tensor(), torch.tensor(owner, dtype=torch.long), img.ids, txt.ids


def cmd_embed(argv: list[str]) -> int:
    """dualenc embed --model EXPORT (--images SRC | --texts SRC) --out DIR"""
    from dualenc.eval.embed import SOURCES, embed_to_dir
    from dualenc.eval.store import FILE_FORMATS

    p = DefaultsParser(prog="dualenc embed", description="Embed images or texts into a directory of "
                       "sharded vectors with ids and a manifest.json (for an index, `dualenc compose` or "
                       "`dualenc retrieval --images/--texts`). Rerunning resumes: finished shards are "
                       "skipped.")
    p.add_argument("--model", required=True, help="a dualenc export directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image shards (spec) or an image folder; ids: sample keys / relative paths")
    src.add_argument("--texts", help="caption shards (ids KEY#j, one per caption line) or a text file (one text "
                     "per line; ids: line numbers)")
    p.add_argument("--out", required=True, help="output embeddings directory")
    p.add_argument("--format", choices=FILE_FORMATS, default="npy")
    p.add_argument("--source", choices=SOURCES, default="auto")
    p.add_argument("--shard-size", type=int, default=10000, help="items per output shard (folders, text files; "
                   "shards map one input tar to one output shard)")
    p.add_argument("--caption-key", default="txt")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace embeddings of another model/source in --out")
    a = p.parse_args(argv)
    kind, src_spec = ("image", a.images) if a.images else ("text", a.texts)
    model = _load(a.model)
    manifest = embed_to_dir(model, src_spec, a.out, kind, os.path.abspath(a.model), source=a.source,
                            batch_size=a.batch_size, num_workers=a.workers, shard_size=a.shard_size,
                            file_format=a.format, caption_key=a.caption_key, overwrite=a.overwrite, device=_device())
    print(f"{manifest['count']} {kind} embeddings (dim {manifest['dim']}) in {len(manifest['shards'])} shard(s) "
          f"at {a.out}")
    return 0


def cmd_compose(argv: list[str]) -> int:
    """dualenc compose --model EXPORT --gallery EMB_DIR --image IMG --text "red" --weight 1.0 -k 5"""
    from dualenc.eval.compose import composed_query, nearest
    from dualenc.eval.report import write_results
    from dualenc.eval.store import load_embeddings

    p = DefaultsParser(prog="dualenc compose", description="Composed image+text query (ALIGN): "
                       "normalize(image + w1*text1 + w2*text2 ...), nearest images of an embedded gallery. "
                       "A negative weight subtracts a concept.")
    p.add_argument("--model", required=True, help="the dualenc export that embedded the gallery")
    p.add_argument("--gallery", required=True, help="an image embeddings directory (dualenc embed --images)")
    p.add_argument("--image", required=True, help="the query image file")
    p.add_argument("--text", action="append", required=True, help="text to add; repeat for several")
    p.add_argument("--weight", type=float, action="append", help="weight per --text (one weight applies to all; "
                   "default 1.0)")
    p.add_argument("-k", type=int, default=5, help="how many neighbours")
    p.add_argument("--exclude", action="append", default=[], help="gallery id never to return (e.g. the query's own)")
    p.add_argument("--json", help="write the neighbours to this JSON file")
    a = p.parse_args(argv)
    weights = a.weight or [1.0]
    if len(weights) not in (1, len(a.text)):
        p.error(f"{len(weights)} --weight value(s) for {len(a.text)} --text value(s): give one, or one per text")
    gallery = load_embeddings(a.gallery)
    if gallery.manifest.get("kind") != "image":
        print(f"note: {a.gallery} holds {gallery.manifest.get('kind')} embeddings, not images")
    model = _load(a.model)
    if gallery.dim != int(model.embed_dim):
        raise ValueError(f"embedding sizes differ: gallery {a.gallery} has dim {gallery.dim}, model {a.model} makes "
                         f"{model.embed_dim}; embed the gallery with this model")
    query = composed_query(model, a.image, a.text, weights if len(weights) > 1 else weights[0], _device())
    index = {k: i for i, k in enumerate(gallery.ids)}
    unknown = [e for e in a.exclude if e not in index]
    if unknown:
        raise ValueError(f"--exclude id(s) {unknown} are not in {a.gallery}")
    scores, idx = nearest(query, gallery.tensor(), a.k, [index[e] for e in a.exclude])
    hits = [{"rank": r + 1, "id": gallery.ids[int(i)], "score": float(s)}
            for r, (s, i) in enumerate(zip(scores[0], idx[0]))]
    per_text = weights * len(a.text) if len(weights) == 1 else weights
    terms = " ".join(f"{'+' if w >= 0 else '-'} {abs(w):g}*{t!r}" for t, w in zip(a.text, per_text))
    print(f"query: image {a.image} {terms}")
    for h in hits:
        print(f"{h['rank']:3d}  {h['score']:.4f}  {h['id']}")
    if a.json:
        write_results(a.json, {"query": {"image": a.image, "texts": a.text, "weights": weights}, "neighbours": hits,
                               "gallery": a.gallery, "model": a.model})
    return 0


def cmd_report(argv: list[str]) -> int:
    """dualenc report [--results R.json ...] [--metrics-csv metrics.csv | --tensorboard DIR] --out DIR"""
    from dualenc.eval.plots import plot_temperature
    from dualenc.eval.report import plot_record, read_csv_metric, read_results, summary_table

    p = DefaultsParser(prog="dualenc report", description="Plots and a summary from results JSON files "
                       "(dualenc zeroshot/retrieval --json, EvalCallback results_dir) and the temperature "
                       "curve from Lightning's CSVLogger metrics.csv or TensorBoardLogger event files.")
    p.add_argument("--results", nargs="+", default=[], help="results JSON files")
    p.add_argument("--metrics-csv", help="CSVLogger metrics.csv of a training run")
    p.add_argument("--tensorboard", help="TensorBoard event file, or a folder searched for them (a run's log dir)")
    p.add_argument("--column", default="train/temperature", help="column of --metrics-csv (scalar tag of "
                   "--tensorboard) to plot")
    p.add_argument("--out", required=True, help="directory for the PNG plots")
    a = p.parse_args(argv)
    if not a.results and not a.metrics_csv and not a.tensorboard:
        p.error("give --results and/or --metrics-csv or --tensorboard")
    made: list[Path] = []
    records = [r for f in a.results for r in read_results(f)]
    for r in records:
        made += plot_record(r, a.out)
    if a.metrics_csv or a.tensorboard:
        if a.metrics_csv:
            steps, values = read_csv_metric(a.metrics_csv, a.column)
        else:
            from dualenc.eval.tbevents import read_tensorboard_metric

            steps, values = read_tensorboard_metric(a.tensorboard, a.column)
        made.append(plot_temperature(steps, values, Path(a.out) / f"{a.column.replace('/', '_')}.png",
                                     title=f"{a.column} over training"))
    if records:
        print(summary_table(records))
    print("plots: " + (", ".join(str(m) for m in made) or "none (the results have no details to plot)"))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "zeroshot": cmd_zeroshot,
    "retrieval": cmd_retrieval,
    "embed": cmd_embed,
    "compose": cmd_compose,
    "report": cmd_report,
}
