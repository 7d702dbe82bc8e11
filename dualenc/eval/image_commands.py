"""``dualenc linear-probe`` and ``dualenc knn``: image-tower evaluations on a train and a test split."""

from __future__ import annotations

import argparse
from typing import Any

from dualenc.clihelp import DefaultsParser
from dualenc.eval.commands import _device, _load_any, _model_args

DATA_HELP = ("a CLIP_benchmark root: root/train/*.tar and root/test/*.tar with .cls labels (classnames.txt in root/ "
             "names the classes in the output when present)")


def _common(prog: str, description: str) -> DefaultsParser:
    p = DefaultsParser(prog=prog, description=description)
    _model_args(p)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--train-split", default="train", help="the split the probe / neighbours come from")
    p.add_argument("--split", default="test", help="the split that is scored")
    p.add_argument("--batch-size", type=int, default=256, help="images per embedding batch")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--json", help="write the results (CLIP_benchmark-like JSON) to this file")
    p.add_argument("--plots", help="write a per-class recall plot into this directory")
    p.add_argument("--name", default=None, help="dataset name for the output (default: the data folder's name)")
    return p


def _run(p: argparse.ArgumentParser, a: argparse.Namespace, task: str, score: Any) -> dict[str, Any]:
    """Embed both splits, score them with ``score(train_x, train_y, test_x, test_y, device)``, report."""
    from dualenc.eval.imagesets import embed_splits
    from dualenc.eval.layout import CLASSNAMES
    from dualenc.eval.report import plot_record, result_record, write_results
    from dualenc.eval.suite import data_folder
    from dualenc.eval.zeroshot import read_lines

    if not a.model:
        p.error("--model is required")
    device = _device()
    model = _load_any(a, device)
    train, test = embed_splits(model, a.data, a.train_split, a.split, a.batch_size, a.workers, device,
                               show_progress=True)
    metrics = score(train.embeddings, train.labels, test.embeddings, test.labels, device)
    folder = data_folder(a.data)
    names = read_lines(folder / CLASSNAMES) if (folder / CLASSNAMES).is_file() else None
    details = {"per_class_recall": metrics.pop("per_class_recall"), "train_split": a.train_split,
               "split": a.split, "skipped": {"train": train.skipped, "test": test.skipped}}
    if names and len(names) == len(details["per_class_recall"]):
        details["classnames"] = names
    record = result_record(a.name or folder.name, str(a.model), task, metrics, details)
    if a.json:
        write_results(a.json, record)
    if a.plots:
        print("plots: " + ", ".join(str(m) for m in plot_record(record, a.plots)))
    return metrics


def cmd_linear_probe(argv: list[str]) -> int:
    """dualenc linear-probe --model MODEL --data ROOT [--epochs 10 --lr 0.1 --val-proportion 0.2]"""
    from dualenc.eval.probe import linear_probe

    p = _common("dualenc linear-probe", "Linear probe on the image tower's embeddings, CLIP_benchmark's protocol: "
                "a logistic regression fitted on the train split (weight decay searched on a validation part "
                "carved from it, then refitted on all of it), scored on the test split.")
    p.add_argument("--val-proportion", type=float, default=0.2, help="share of the train split held out for the "
                   "weight-decay search (0: no search, weight decay 0)")
    p.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate (CLIP_benchmark's --fewshot_lr)")
    p.add_argument("--epochs", type=int, default=10, help="CLIP_benchmark's --fewshot_epochs")
    p.add_argument("--probe-batch-size", type=int, default=64, help="features per probe step (CLIP_benchmark's "
                   "--batch_size)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    def score(tx: Any, ty: Any, x: Any, y: Any, device: str) -> dict[str, Any]:
        return linear_probe(tx, ty, x, y, val_proportion=a.val_proportion, lr=a.lr, epochs=a.epochs,
                            batch_size=a.probe_batch_size, seed=a.seed, device=device)

    m = _run(p, a, "linear_probe", score)
    print(f"linear probe top-1 {m['lp_acc1']:.3f}, mean per-class recall {m['lp_mean_per_class_recall']:.3f} "
          f"({m['classes']} classes, chance {1 / m['classes']:.3f}; weight decay {m['weight_decay']:.3g})")
    return 0


def cmd_knn(argv: list[str]) -> int:
    """dualenc knn --model MODEL --data ROOT [--ks 1 10 20 --weighting dino --temperature 0.07]"""
    from dualenc.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, WEIGHTINGS, knn_classify

    p = _common("dualenc knn", "kNN classification of the test split's image embeddings against the train "
                "split's (cosine similarity; ALIGN's KNN R@1 is knn_top1@1).")
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="dino", help="dino: each neighbour votes "
                   "exp(similarity / temperature); uniform: majority vote")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    a = p.parse_args(argv)

    def score(tx: Any, ty: Any, x: Any, y: Any, device: str) -> dict[str, Any]:
        return knn_classify(tx, ty, x, y, ks=a.ks, temperature=a.temperature, weighting=a.weighting, device=device)

    m = _run(p, a, "knn_classification", score)
    ks = ", ".join(f"k={k} {m[f'knn_top1@{k}']:.3f}" for k in a.ks)
    print(f"kNN top-1 ({a.weighting} vote, {m['train_samples']} train images): {ks} ({m['classes']} classes, "
          f"chance {1 / m['classes']:.3f})")
    return 0


COMMANDS = {"linear-probe": cmd_linear_probe, "knn": cmd_knn}
