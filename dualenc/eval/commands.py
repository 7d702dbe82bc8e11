"""Evaluation subcommands of the ``dualenc`` CLI (each ``main(argv) -> exit code``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


def cmd_zeroshot(argv: list[str]) -> int:
    """dualenc zeroshot --model EXPORT_DIR --data SHARDS [--classnames F --templates F]"""
    import torch

    from dualenc.data.datamodule import eval_loader
    from dualenc.eval.zeroshot import build_classifier, evaluate, read_lines
    from dualenc.export import load_model

    p = argparse.ArgumentParser(prog="dualenc zeroshot", description="Zero-shot classification of labelled "
                                "image shards (CLIP_benchmark layout: .jpg + .cls, classnames.txt and "
                                "zeroshot_classification_templates.txt beside the shards).")
    p.add_argument("--model", required=True, help="a dualenc export directory")
    p.add_argument("--data", required=True, help="shard spec (directory, brace pattern, glob)")
    p.add_argument("--classnames", help="one class name per line (default: classnames.txt in --data)")
    p.add_argument("--templates", help="one template with {c} per line "
                   "(default: zeroshot_classification_templates.txt in --data)")
    p.add_argument("--name", default=None, help="dataset name for the printed line")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="write the metrics to this JSON file")
    a = p.parse_args(argv)
    folder = Path(a.data) if Path(a.data).is_dir() else Path(a.data).parent
    classnames = read_lines(a.classnames or folder / "classnames.txt")
    templates = read_lines(a.templates or folder / "zeroshot_classification_templates.txt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(a.model).to(device)
    tokenize = model.text_tower.tokenizer_fn()
    classifier = build_classifier(model, tokenize, classnames, templates, device)
    loader = eval_loader(a.data, model.image_tower.data_config, a.batch_size, a.workers)
    metrics = evaluate(model, loader, classifier, device)
    name = a.name or folder.name
    if a.json:
        Path(a.json).write_text(json.dumps({"dataset": name, "model": str(a.model), "task": "zeroshot_classification",
                                            "metrics": metrics}, indent=2))
    print(f"zero-shot top-1 on {name}: {metrics['top1']:.2f} ({len(classnames)} classes, "
          f"chance {1 / len(classnames):.2f})")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"zeroshot": cmd_zeroshot}
