"""Cross-model alignment study at the demo's scale: does a shared orthogonal map fitted on images carry text?

Reproduces (or not) the claim of "Canonicalizing Multimodal Contrastive Representation Learning" with
two dual encoders trained independently on the demo data (different image-tower families, seeds and
embedding sizes), then unpaired text translation (vec2vec, MNN-/Sinkhorn-Procrustes).

One command (trains both models unless their exports exist; ``--retrain`` forces it)::

    .venv/bin/python bench/study_alignment.py

Writes bench/results/alignment_study.json, docs/alignment_*.png and the generated block of
docs/alignment.md. The fitting/scoring lives in ``dualenc.plugins.study`` (tested); this script
only trains, embeds and reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from dualenc.data.datamodule import eval_loader  # noqa: E402
from dualenc.data.sources import expand_urls  # noqa: E402
from dualenc.eval.encode import encode_texts  # noqa: E402
from dualenc.eval.zeroshot import build_classifier, read_lines  # noqa: E402
from dualenc.export import load_model  # noqa: E402
from dualenc.plugins.mapfile import fingerprint_module  # noqa: E402
from dualenc.plugins.study import (EvalSet, anchor_sweep, plot_sweep, reference_metrics, summarize,  # noqa: E402
                                   unpaired_study, write_json_atomic)

MODELS = {
    # name -> (config, run dir, extra CLI overrides). Seeds/dims/towers differ: see configs/demo_b.yaml.
    "a": ("configs/demo.yaml", "runs/study_a", ["--seed_everything", "0"]),
    "b": ("configs/demo_b.yaml", "runs/study_b", []),
}
BEGIN, END = "<!-- generated:begin (bench/study_alignment.py) -->", "<!-- generated:end -->"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- models -------------------------------------------------------------------------------------------

def ensure_data(data: Path) -> None:
    """Build the demo data and tokenizer if missing (never overwrites: other runs may use them)."""
    bin_dir = Path(sys.executable).parent
    if not (data / "train").is_dir():
        subprocess.run([str(bin_dir / "dualenc-data"), "demo", "--out", str(data)], check=True, cwd=ROOT)
    if not (data / "tokenizer").is_dir():
        subprocess.run([str(bin_dir / "dualenc-data"), "tokenizer", "--shards", str(data / "train"), "--out",
                        str(data / "tokenizer")], check=True, cwd=ROOT)


def ensure_model(name: str, epochs: int, retrain: bool) -> dict[str, Any]:
    """Train model ``name`` with ``dualenc fit`` unless its export exists; returns what was done."""
    config, run_dir, extra = MODELS[name]
    export = ROOT / run_dir / "export"
    cmd = [str(Path(sys.executable).parent / "dualenc"), "fit", "--config", config,
           "--trainer.default_root_dir", run_dir, "--trainer.max_epochs", str(epochs), *extra]
    info: dict[str, Any] = {"config": config, "export": f"{run_dir}/export", "command": " ".join(cmd[1:])}
    if (export / "model.safetensors").is_file() and not retrain:
        info["trained"] = "reused existing export"
        return info
    (ROOT / run_dir).mkdir(parents=True, exist_ok=True)
    log(f"training model {name}: dualenc {' '.join(cmd[1:])}")
    t0 = time.time()
    with open(ROOT / run_dir / "fit.log", "w") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    info["trained"] = f"trained here in {time.time() - t0:.0f} s"
    return info


def describe(run_dir: Path) -> dict[str, Any]:
    """Image tower, embedding size (from the export) and seed (from the newest Lightning config)."""
    cfg = json.loads((run_dir / "export" / "config.json").read_text())
    out = {"image_tower": cfg["image_tower"]["kwargs"]["model_name"], "embed_dim": cfg["model"]["embed_dim"],
           "seed": None}
    logs = sorted((run_dir / "lightning_logs").glob("version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    if logs:
        out["seed"] = (yaml.safe_load(logs[-1].read_text()) or {}).get("seed_everything")
        out["lightning_config"] = str(logs[-1].relative_to(ROOT))
    return out


# -- embedding ----------------------------------------------------------------------------------------

@torch.no_grad()
def embed_images(model: Any, urls: list[str], limit: int | None = None,
                 batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images (N, D), .cls labels, captions) of the shards in order, the first ``limit`` samples."""
    embs, labels, caps = [], [], []
    for batch in eval_loader(urls, model.image_tower.data_config, batch_size, num_workers=1, label_key="cls",
                             caption_key="txt"):
        embs.append(model.encode_image(batch["image"]).float())
        labels.append(batch["label"].long())
        caps += [str(t).strip() for t in batch["text"]]
        if limit is not None and len(caps) >= limit:
            break
    n = len(caps) if limit is None else min(limit, len(caps))
    return torch.cat(embs)[:n], torch.cat(labels)[:n], caps[:n]


def read_captions(urls: list[str]) -> list[str]:
    """All ``.txt`` captions of the shards, in order (no images decoded)."""
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.name.endswith(".txt"):
                    out.append(tar.extractfile(m).read().decode("utf-8").strip())
    return out


def unique_in_order(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def build_sets(models: dict[str, Any], data: Path, pool: int, text_pool: int, seed: int) -> dict[str, Any]:
    """Embed everything with both models. Anchor images: train; held-out images: val + heldout."""
    train_urls = expand_urls(str(data / "train"))
    g = torch.Generator().manual_seed(seed)
    train_caps = unique_in_order(read_captions(train_urls))
    order = torch.randperm(len(train_caps), generator=g).tolist()
    if text_pool >= len(order):
        raise ValueError(f"--text-pool {text_pool} leaves no held-out captions ({len(order)} unique in train)")
    fit_texts = [train_caps[i] for i in order[:text_pool]]  # text means + unpaired training (split in halves)
    eval_texts = [train_caps[i] for i in order[text_pool:]]  # held-out captions for text transfer
    out: dict[str, Any] = {"meta": {"unique_train_captions": len(train_caps), "fit_texts": len(fit_texts),
                                    "eval_texts": len(eval_texts)}}
    for name, model in models.items():
        t0 = time.time()
        tok = model.text_tower.tokenizer_fn()
        anchor, anchor_cls, _ = embed_images(model, train_urls, limit=pool)
        parts = {s: embed_images(model, expand_urls(str(data / s))) for s in ("val", "heldout")}
        image = torch.cat([parts[s][0] for s in ("val", "heldout")])
        caps = parts["val"][2] + parts["heldout"][2]
        class_caps = unique_in_order(caps)  # clean captions name the class: "a red circle"
        cid = {c: i for i, c in enumerate(class_caps)}
        classifiers, zs = {}, {}
        offset = 0
        for s in ("val", "heldout"):
            names = read_lines(data / s / "classnames.txt")
            templates = read_lines(data / s / "zeroshot_classification_templates.txt")
            classifiers[s] = build_classifier(model, tok, names, templates).float()
            n = len(parts[s][0])
            zs[s] = (torch.arange(offset, offset + n), parts[s][1])
            offset += n
        out[name] = {
            "anchor": anchor, "anchor_class": anchor_cls,
            "eval": EvalSet(image=image, image_class=torch.tensor([cid[c] for c in caps]),
                            class_text=encode_texts(model, tok, class_caps), text=encode_texts(model, tok, eval_texts),
                            classifiers=classifiers),
            "fit_text": encode_texts(model, tok, fit_texts),
        }
        out["zeroshot"] = zs
        out["meta"].update(anchor_pool=len(anchor), eval_images={s: len(parts[s][0]) for s in parts},
                           classes=len(class_caps))
        log(f"embedded with model {name} in {time.time() - t0:.0f} s")
    return out


def cached_sets(models: dict[str, Any], fingerprints: dict[str, str], data: Path, pool: int, text_pool: int,
                seed: int, cache: Path | None) -> dict[str, Any]:
    """``build_sets``, reused from ``cache`` when the models (by weight fingerprint) and settings match."""
    key = {"fingerprints": fingerprints, "data": str(data), "pool": pool, "text_pool": text_pool, "seed": seed}
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)  # plain tensors, lists and strings: nothing to unpickle
        if saved.get("key") == key:
            log(f"reusing embeddings from {cache}")
            for n in models:
                saved["sets"][n]["eval"] = EvalSet(**saved["sets"][n]["eval"])
            return saved["sets"]
    sets = build_sets(models, data, pool, text_pool, seed)
    if cache is not None:
        plain = {k: ({**v, "eval": dataclasses.asdict(v["eval"])} if k in models else v) for k, v in sets.items()}
        tmp = cache.with_name(f".{cache.name}.tmp")
        torch.save({"key": key, "sets": plain}, tmp)
        os.replace(tmp, cache)
    return sets


# -- report -------------------------------------------------------------------------------------------

TRANSFER = [("image/cos", "image cosine (A->B vs B)"), ("class_text/cos", "class-caption cosine"),
            ("text/cos", "held-out caption cosine"), ("image/top1", "image top-1 (2,200 candidates)"),
            ("text/top1", "caption top-1 (held-out captions)"), ("class_text/top1", "class-caption top-1 (80)")]
TASKS = [("b_text->a_image/R@1", "B text -> A images (mapped): R@1"),
         ("a_text->b_image/R@1", "A text (mapped) -> B images: R@1"),
         ("zeroshot/heldout/top1", "zero-shot, 24 unseen combos: top-1"),
         ("zeroshot/val/top1", "zero-shot, 56 seen classes: top-1")]


def fmt(s: dict[str, float] | None, digits: int = 3) -> str:
    if not s:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s.get("n", 1) > 1 else f"{s['mean']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    summ, sizes, refs = result["sweep"]["summary"], result["config"]["sizes"], result["references"]
    methods = list(summ)
    lines = [f"Run {result['run']['date']} on {result['run']['machine']} ({result['run']['wall_s']:.0f} s wall "
             f"for the study after training; training: A {result['models']['a']['trained']}, "
             f"B {result['models']['b']['trained']}).", ""]
    lines += ["| model | image tower | seed | embed dim | own text->image R@1 | own zero-shot unseen / seen |",
              "|---|---|---|---|---|---|"]
    for m in ("a", "b"):
        info = result["models"][m]
        lines.append(f"| {m.upper()} | {info['image_tower']} | {info['seed']} | {info['embed_dim']} | "
                     f"{refs[f'{m}/text->image/R@1']:.3f} | {refs[f'{m}/zeroshot/heldout/top1']:.3f} / "
                     f"{refs[f'{m}/zeroshot/val/top1']:.3f} |")
    lines.append("")
    for key, label in TRANSFER + TASKS:
        lines += [f"**{label}** (`{key}`), mean ± std over {result['config']['repeats']} anchor draws:", "",
                  "| method | " + " | ".join(str(s) for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for meth in methods:
            lines.append(f"| {meth} | " + " | ".join(fmt(summ[meth].get(str(s), {}).get(key)) for s in sizes) + " |")
        lines.append("")
    classes = {s: summ["procrustes"][str(s)].get("anchor_classes") for s in sizes}
    lines += ["Distinct training classes among the anchors: " + ", ".join(
        f"{s}: {fmt(c, 1)}" for s, c in classes.items()) + ".", ""]
    un = result["unpaired"]
    lines += [f"**Unpaired text translation A -> B** ({result['data']['fit_texts'] // 2} captions per side, "
              f"disjoint; scored on {result['data']['eval_texts']} held-out captions):", "",
              "| method | mean cosine | top-1 | mean rank |", "|---|---|---|---|"]
    for meth, m in un.items():
        if meth == "vec2vec/selected":
            meth = f"vec2vec/selected (seed {m['seed']:.0f}, lowest unsupervised score, no pairs)"
        lines.append(f"| {meth} | {m['mean_cosine']:.3f} | {m['top1']:.3f} | {m['mean_rank']:.1f} |")
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    """Replace the generated block of the doc (or create the doc around one), atomically."""
    text = path.read_text() if path.is_file() else f"# Cross-model alignment study\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the {BEGIN} ... {END} markers; add them where the numbers go")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo")
    p.add_argument("--epochs", type=int, default=4, help="training epochs per model (the demo's 4)")
    p.add_argument("--retrain", action="store_true", help="train even if runs/study_{a,b}/export exist")
    p.add_argument("--sizes", default="10,30,100,300,1000", help="anchor counts")
    p.add_argument("--repeats", type=int, default=5, help="anchor draws per count")
    p.add_argument("--pool", type=int, default=3000, help="train images embedded as the anchor pool")
    p.add_argument("--text-pool", type=int, default=3000,
                   help="unique train captions for text means / unpaired training; the rest are held out")
    p.add_argument("--vec2vec-seeds", default="0,1,2")
    p.add_argument("--vec2vec-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="runs/study_b/alignment_embeddings.pt",
                   help="embeddings cache, reused while the models are unchanged ('' to disable)")
    p.add_argument("--json", default="bench/results/alignment_study.json")
    p.add_argument("--doc", default="docs/alignment.md")
    p.add_argument("--plots", default="docs/alignment")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    data = Path(a.data)
    sizes = [int(s) for s in a.sizes.split(",")]
    ensure_data(data)
    models_info = {n: ensure_model(n, a.epochs, a.retrain) for n in MODELS}
    t0 = time.time()
    # Small kernels from here on: on a shared 2-core box, 2 intra-op threads wait on each other's
    # OpenMP barriers and run 10x slower than 1. Denormals (GAN logits) are flushed for the same reason.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    models = {n: load_model(ROOT / MODELS[n][1] / "export") for n in MODELS}
    for n, m in models.items():
        models_info[n].update(describe(ROOT / MODELS[n][1]), fingerprint=fingerprint_module(m))
    sets = cached_sets(models, {n: models_info[n]["fingerprint"] for n in models}, data, a.pool, a.text_pool,
                       a.seed, Path(a.cache) if a.cache else None)
    A, B, zs = sets["a"], sets["b"], sets["zeroshot"]
    refs = reference_metrics(A["eval"], B["eval"], zs)
    log("references: " + ", ".join(f"{k} {v:.3f}" for k, v in refs.items() if "top5" not in k))
    records = anchor_sweep(A["anchor"], B["anchor"], A["eval"], B["eval"], sizes, a.repeats,
                           text_means=(A["fit_text"], B["fit_text"]), zeroshot=zs, anchor_class=A["anchor_class"],
                           seed=a.seed, log=log)
    summary = summarize(records)
    # Unpaired: A sees one half of the caption pool, B the other (different items, no pairs).
    half = len(A["fit_text"]) // 2
    unpaired = unpaired_study(A["fit_text"][:half], B["fit_text"][half:], A["eval"].text, B["eval"].text,
                              paired_a=A["fit_text"][:half], paired_b=B["fit_text"][:half],
                              vec2vec_seeds=[int(s) for s in a.vec2vec_seeds.split(",") if s],
                              vec2vec_steps=a.vec2vec_steps, log=log)
    methods = ["identity", "procrustes", "procrustes_image_means", "linear", "linear_ridge", "mlp"]
    # Each model alone (its own text vs its own images): B's is the ceiling, A's is what mapping must beat.
    ref_lines = {f"{key}|{m.upper()} alone": refs[f"{m}/{ref}"] for m in ("a", "b") for key, ref in (
        ("b_text->a_image/R@1", "text->image/R@1"), ("a_text->b_image/R@1", "text->image/R@1"),
        ("zeroshot/heldout/top1", "zeroshot/heldout/top1"), ("zeroshot/val/top1", "zeroshot/val/top1"))}
    plots = [plot_sweep(summary, TRANSFER, f"{a.plots}_transfer.png", methods,
                        title="A -> B transfer vs image anchors (fitted on images only)"),
             plot_sweep(summary, TASKS, f"{a.plots}_tasks.png", methods, references=ref_lines,
                        title="Cross-model retrieval and zero-shot in B's space")]
    result = {
        "run": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.time() - t0,
                "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "torch": torch.__version__,
                "command": "python bench/study_alignment.py " + " ".join(argv if argv is not None else sys.argv[1:])},
        "config": {**vars(a), "sizes": sizes},
        "models": models_info,
        "data": sets["meta"],
        "references": refs,
        "sweep": {"summary": summary, "records": records},
        "unpaired": unpaired,
        "plots": [str(Path(x)) for x in plots],
    }
    write_json_atomic(a.json, result)
    write_doc(Path(a.doc), markdown(result))
    log(f"wrote {a.json}, {a.doc}, {', '.join(map(str, plots))} ({time.time() - t0:.0f} s after training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
