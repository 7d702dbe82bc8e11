"""``dualenc align``: fit, apply and evaluate embedding maps, and embed data with a target model.

    dualenc align embed --target dualenc --target-args '{"path": "runs/a/export"}' --shards data/val --out a.safetensors
    dualenc align fit   --method procrustes --source a.safetensors --target b.safetensors --out a2b.safetensors
    dualenc align apply --map a2b.safetensors --input a_new.safetensors --modality text --out mapped.safetensors
    dualenc align eval  --map a2b.safetensors --source a.safetensors --target b.safetensors
    dualenc align eval  --map a2b.safetensors --source runs/a/export --target runs/b/export --shards data/val
    dualenc align list

Embedding files carry their model's identity, so ``apply``/``eval`` refuse a map fitted for another model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from dualenc.clihelp import DefaultsParser
from dualenc.errors import ConfigError, UserError, debug_wanted, message


def _json_arg(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} must be a JSON object, e.g. '{{\"k\": 8}}': {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _fail(msg: str) -> int:
    print(f"dualenc align: error: {msg}", file=sys.stderr)
    return 2


def cmd_list(a: argparse.Namespace) -> int:
    from dualenc.plugins import PLUGINS, TARGETS

    print("methods/plugins:", ", ".join(PLUGINS.names()))
    print("targets:", ", ".join(TARGETS.names()))
    return 0


def _device(a: argparse.Namespace) -> str:
    return "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"


def embed_shards(target: Any, shards: str, caption_key: str | None, batch_size: int, workers: int,
                 device: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Image (and, with ``caption_key``, caption) embeddings of every sample of ``shards``, and the keys."""
    from dualenc.data.datamodule import eval_loader
    from dualenc.progress import progress, sample_total

    imgs, txts, keys = [], [], []
    loader = eval_loader(shards, target.data_config(), batch_size, workers, label_key=None, caption_key=caption_key)
    bar = progress(total=sample_total(shards), desc=f"embedding {shards} with {target.name}", unit="image")
    for batch in loader:
        bar.update(len(batch["key"]))
        imgs.append(target.encode_image(batch["image"].to(device)).cpu())
        if caption_key:
            txts.append(target.encode_text(batch["text"]).cpu())
        keys += list(batch["key"])
    bar.close()
    if not imgs:
        raise ValueError(f"no samples read from {shards}")
    arrays = {"image": torch.cat(imgs)}
    if txts:
        arrays["text"] = torch.cat(txts)
    return arrays, keys


def cmd_embed(a: argparse.Namespace) -> int:
    from dualenc.plugins.embeddings import save_embeddings
    from dualenc.plugins.targets import build_target

    if not a.texts and not a.shards:
        return _fail("give --texts FILE and/or --shards SPEC")
    target = build_target(a.target, **_json_arg(a.target_args, "--target-args"))
    device = _device(a)
    target.to(device)
    arrays: dict[str, torch.Tensor] = {}
    keys: list[str] | None = None
    if a.shards:
        arrays, keys = embed_shards(target, a.shards, a.caption_key, a.batch_size, a.workers, device)
    if a.texts:
        if "text" in arrays:
            return _fail("--texts and captions from --shards both give text; pass --caption-key '' to drop captions")
        lines = [ln.strip() for ln in Path(a.texts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            return _fail(f"{a.texts} has no texts")
        from dualenc.progress import progress

        arrays["text"] = torch.cat([target.encode_text(lines[i:i + a.batch_size]).cpu()
                                    for i in progress(range(0, len(lines), a.batch_size), desc=f"embedding {a.texts}",
                                                      unit="batch")])
        if keys is None:
            keys = [f"{i:08d}" for i in range(len(lines))]
        elif len(lines) != len(keys):
            return _fail(f"{len(lines)} texts but {len(keys)} images: they must pair up row by row")
    save_embeddings(a.out, arrays, target.identity(), keys)
    print(f"wrote {', '.join(f'{k} {tuple(v.shape)}' for k, v in arrays.items())} from {target.name} to {a.out}")
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from dualenc.plugins import PLUGINS
    from dualenc.plugins.embeddings import load_embeddings

    plugin = PLUGINS.get(a.method)
    if not hasattr(plugin, "fit_embeddings"):
        return _fail(f"plugin {a.method!r} cannot be fitted stand-alone (it is a training plugin)")
    src = _fit_view(load_embeddings(a.source, a.source_model), a.modality)
    tgt = _fit_view(load_embeddings(a.target, a.target_model), a.modality) if a.target else None
    kwargs = _json_arg(a.args, "--args")
    if a.on_few_anchors:
        kwargs["on_few_anchors"] = a.on_few_anchors
    if a.method == "vec2vec" and not a.quiet:
        kwargs.setdefault("log_every", max(1, int(kwargs.get("steps", 2000)) // 20))
        kwargs.setdefault("progress", _print_progress)
    m = plugin.fit_embeddings(src, tgt, **kwargs) if tgt is not None else plugin.fit_embeddings(src, **kwargs)
    m.save(a.out)
    print(f"fitted {a.method} map {m.meta.source.name} -> {m.meta.target.name if m.meta.target else '-'} "
          f"on {m.meta.anchors} anchors; saved to {a.out}")
    print(json.dumps(m.meta.extra, sort_keys=True))
    return 0


def _print_progress(row: dict[str, float]) -> None:
    print("  step {step:.0f}: loss {loss:.4f} (disc {disc:.4f}, adversarial {adversarial:.4f}, cycle {cycle:.4f}, "
          "vsp {vsp:.4f}, reconstruction {reconstruction:.4f})".format(**row), file=sys.stderr, flush=True)


def _fit_view(data: Any, modality: str | None) -> Any:
    """The embeddings a fitter sees: fitters fit on the ``image`` array (the anchor modality); ``--modality
    text``, or a file holding only text (or one bare matrix), fits on those rows instead. They are then
    offered as both modalities, so the map also has the text means that ``apply --modality text`` needs."""
    from dualenc.plugins.embeddings import EmbeddingSet

    if modality is None:
        if "image" in data.arrays:
            return data
        modality = "text" if "text" in data.arrays else "image"  # text-only, or one bare matrix
    x = data.get(modality)
    if modality == "image" and "image" in data.arrays:
        return data
    return EmbeddingSet({"image": x, "text": x}, data.model, data.keys, data.source_path)


def cmd_apply(a: argparse.Namespace) -> int:
    from dualenc.plugins.embeddings import load_embeddings, save_embeddings, save_npy_atomic
    from dualenc.plugins.maps import load_map

    m = load_map(a.map)
    data = load_embeddings(a.input, a.model)
    mods = [a.modality] if a.modality else [k for k in ("image", "text") if k in data.arrays] or ["image"]
    out = {mod: m.apply(data.get(mod).double(), mod, source=data.model, normalize=a.normalize).float() for mod in mods}
    if a.out.endswith(".npy"):
        if len(out) != 1:
            return _fail("an .npy output holds one matrix; pass --modality or write .safetensors")
        save_npy_atomic(a.out, next(iter(out.values())).numpy())
    else:
        from dualenc.plugins.mapfile import ModelId

        # The result lives in the target's space but was not made by the target model: no fingerprint.
        tgt = m.meta.target or m.meta.source
        save_embeddings(a.out, out, ModelId(f"{tgt.name} (mapped from {data.model.name})", tgt.dim, None), data.keys)
    print(f"mapped {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.items())} -> {a.out}")
    return 0


def _paired(src: Any, tgt: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Row-aligned matrices of both sets: by common keys when both have keys, else row by row."""
    mods = [m for m in ("image", "text") if m in src.arrays and m in tgt.arrays]
    if not mods:  # a bare matrix (.npy) pairs with whatever the other side holds
        mods = [m for m in ("image", "text") if src.maybe(m) is not None and tgt.maybe(m) is not None][:1]
    if not mods:
        raise ValueError("the source and target files share no modality (image/text)")
    src_arrays = {m: src.maybe(m) for m in mods}
    tgt_arrays = {m: tgt.maybe(m) for m in mods}
    if src.keys is not None and tgt.keys is not None:
        ti = tgt.index()
        common = [(i, ti[k]) for i, k in enumerate(src.keys) if k in ti]
        if not common:
            raise ValueError("the source and target files have no sample key in common")
        si, tj = torch.tensor([c[0] for c in common]), torch.tensor([c[1] for c in common])
        return {m: src_arrays[m][si] for m in mods}, {m: tgt_arrays[m][tj] for m in mods}
    for m in mods:
        if src_arrays[m].shape[0] != tgt_arrays[m].shape[0]:
            raise ValueError(f"{m}: {src_arrays[m].shape[0]} source rows vs {tgt_arrays[m].shape[0]} target rows "
                             "and no keys to pair them")
    return src_arrays, tgt_arrays


def cmd_eval(a: argparse.Namespace) -> int:
    from dualenc.plugins.crossmodel import compatibility_report, cross_model_report
    from dualenc.plugins.embeddings import load_embeddings
    from dualenc.plugins.maps import load_map

    if a.shards:
        src, tgt = _embed_exports(a)
    else:
        src = load_embeddings(a.source, a.source_model)
        tgt = load_embeddings(a.target, a.target_model)
    m = load_map(a.map, source=src.model, target=tgt.model)
    sa, tb = _paired(src, tgt)
    inv = m.inverse() if hasattr(m, "inverse") else None
    ks = tuple(int(k) for k in a.ks.split(","))
    a_to_b = lambda x, mod: m.apply(x, mod).float()  # noqa: E731
    sa, tb = {k: v.double() for k, v in sa.items()}, {k: v.double() for k, v in tb.items()}
    report: dict[str, Any] = cross_model_report(
        sa, tb, a_to_b, (lambda x, mod: inv.apply(x, mod).float()) if inv is not None else None, ks=ks)
    # The source is the new model, the target the old one whose index would be kept.
    report.update(compatibility_report(sa, tb, a_to_b, metric=a.compat_metric, ks=ks))
    if not a.no_baselines:
        report["baselines"] = baseline_rows(sa, tb)
    text = json.dumps(report, indent=2, sort_keys=True)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 0


def baseline_rows(sa: dict[str, torch.Tensor], tb: dict[str, torch.Tensor], seed: int = 20260514) -> dict[str, Any]:
    """What a map must beat, per modality: ``identity`` (equal dims only), ``constant_mean`` (every row
    predicted as the target's mean: it calibrates mean cosine, which is high for anisotropic spaces) and
    ``random_q`` (a random orthogonal map plus the true mean shift: chance level for ranks)."""
    from dualenc.plugins.crossmodel import translation_metrics
    from dualenc.plugins.synthetic import random_orthogonal

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(seed)
    for m, x in sa.items():
        y = tb[m]
        rows: dict[str, dict[str, float]] = {}
        if x.shape[1] == y.shape[1]:
            rows["identity"] = translation_metrics(x.float(), y.float())
        rows["constant_mean"] = translation_metrics(y.mean(0, keepdim=True).expand_as(y).float(), y.float())
        q = random_orthogonal(y.shape[1], x.shape[1], g, x.dtype)
        rows["random_q"] = translation_metrics(((x - x.mean(0)) @ q.T + y.mean(0)).float(), y.float())
        out[m] = rows
    return out


def _embed_exports(a: argparse.Namespace) -> tuple[Any, Any]:
    """``eval --shards``: embed the shards with the two dualenc exports named by --source/--target."""
    from dualenc.plugins.embeddings import EmbeddingSet
    from dualenc.plugins.targets import build_target

    if a.source_model or a.target_model:
        raise ValueError("--source-model/--target-model name the models of embedding files; with --shards the "
                         "exports' weights identify them")
    sets = []
    for path in (a.source, a.target):
        if not Path(path).is_dir():
            raise ValueError(f"with --shards, --source and --target are dualenc export directories; {path} is not one")
        target = build_target("dualenc", path=path).to(_device(a))
        arrays, keys = embed_shards(target, a.shards, a.caption_key, a.batch_size, a.workers, _device(a))
        sets.append(EmbeddingSet(arrays, target.identity(), keys))
    return sets[0], sets[1]


def build_parser() -> argparse.ArgumentParser:
    p = DefaultsParser(prog="dualenc align", description="Move embeddings between models: fit, apply "
                       "and evaluate maps (Procrustes, whitening, MNN-Procrustes, vec2vec).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list", help="list map methods and target kinds")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("embed", help="embed texts and/or image shards with a target model")
    s.add_argument("--target", required=True, help="target kind: dualenc, open_clip, hf_clip, ...")
    s.add_argument("--target-args", help="JSON object of the target's arguments")
    s.add_argument("--texts", help="a text file, one text per line")
    s.add_argument("--shards", help="WebDataset shard spec (images, and captions per --caption-key)")
    s.add_argument("--caption-key", default="txt", help="caption member of the shards ('' for none)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--cpu", action="store_true", help="do not use a GPU even if there is one")
    s.add_argument("--out", required=True, help="output .safetensors")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("fit", help="fit a map from embedding files")
    s.add_argument("--method", required=True,
                   help="procrustes, whitening, mnn_procrustes (0 pairs; --args '{\"robust\": true}' between two "
                        "different models: similarity-profile start + CSLS self-learning), vec2vec (started from "
                        "robust MNN-Procrustes; --args '{\"init\": null}' for the paper's random start), ...")
    s.add_argument("--source", required=True, help="source embeddings (paired rows with --target for procrustes)")
    s.add_argument("--target", help="target embeddings (none for whitening)")
    s.add_argument("--source-model", help="source model name when the file does not record it")
    s.add_argument("--target-model", help="target model name when the file does not record it")
    s.add_argument("--on-few-anchors", choices=("warn", "error"))
    s.add_argument("--args", help="JSON object of method arguments (e.g. '{\"k\": 64}' for whitening)")
    s.add_argument("--modality", choices=("image", "text"), help="the rows to fit on (default: image if the files "
                   "have it, else text, else the one matrix of an .npy)")
    s.add_argument("--quiet", action="store_true", help="no training progress (vec2vec prints its losses)")
    s.add_argument("--out", required=True, help="output map .safetensors")
    s.set_defaults(fn=cmd_fit)

    s = sub.add_parser("apply", help="map embeddings with a fitted map")
    s.add_argument("--map", required=True)
    s.add_argument("--input", required=True, help="embeddings of the map's source model")
    s.add_argument("--model", help="input model name when the file does not record it")
    s.add_argument("--modality", choices=("image", "text"), help="default: every modality in the file")
    s.add_argument("--normalize", action="store_true", help="L2-normalize the mapped embeddings")
    s.add_argument("--out", required=True, help=".safetensors (keeps keys) or .npy")
    s.set_defaults(fn=cmd_apply)

    s = sub.add_parser("eval", help="cross-model metrics and the backward-compatibility criterion of a map, on "
                       "paired embeddings of both models (or shards embedded by two exports)")
    s.add_argument("--map", required=True)
    s.add_argument("--source", required=True, help="the map's source (the new model): an embeddings file, or with "
                   "--shards a dualenc export directory")
    s.add_argument("--target", required=True, help="the map's target (the old model, whose index is kept)")
    s.add_argument("--source-model")
    s.add_argument("--target-model")
    s.add_argument("--shards", help="image + caption shards to embed with the --source and --target exports")
    s.add_argument("--caption-key", default="txt", help="caption member of --shards")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--cpu", action="store_true", help="do not use a GPU even if there is one")
    s.add_argument("--ks", default="1,5,10", help="Recall@K cut-offs")
    s.add_argument("--compat-metric", default="R@1", help="metric of the backward-compatibility criterion: R@K, "
                   "top1, mean_rank or median_rank")
    s.add_argument("--json", help="also write the metrics here")
    s.add_argument("--no-baselines", action="store_true", help="skip the identity / constant-mean / random-Q rows")
    s.set_defaults(fn=cmd_eval)
    return p


def cmd_align(argv: list[str]) -> int:
    """dualenc align {list,embed,fit,apply,eval} ..."""
    from dualenc.plugins.mapfile import MapMismatchError

    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (UserError, MapMismatchError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
        if debug_wanted():  # --debug / DUALENC_DEBUG=1
            raise
        return _fail(message(e))


COMMANDS: dict[str, Callable[[list[str]], int]] = {"align": cmd_align}
