"""The ``dualenc`` command: LightningCLI (fit/validate/test/predict) plus extra subcommands.

Config files may start with ``__base__: other.yaml`` (relative to the file); the base is loaded
first and the file's keys override it, so each shipped config is a short override of base.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import yaml

BASE_KEY = "__base__"


def resolve_config(path: str | Path) -> list[Path]:
    """``path`` and its ``__base__`` chain, base first, each as a file with the key removed."""
    chain: list[Path] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None:
        current = current.resolve()
        if current in seen:
            raise ValueError(f"config {current} is part of a {BASE_KEY} cycle")
        if not current.is_file():
            raise FileNotFoundError(f"config file {str(current)!r} does not exist")
        seen.add(current)
        data = yaml.safe_load(current.read_text()) or {}
        base = data.pop(BASE_KEY, None) if isinstance(data, dict) else None
        if base is None:
            chain.append(current)
        else:
            tmp = tempfile.NamedTemporaryFile("w", suffix=f"_{current.name}", delete=False)
            yaml.safe_dump(data, tmp, sort_keys=False)
            tmp.close()
            chain.append(Path(tmp.name))
        current = (current.parent / base) if base else None
    return chain[::-1]


def expand_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config X`` by ``--config BASE ... --config X`` following ``__base__``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        for f in resolve_config(value):
            out += ["--config", str(f)]
    return out


def make_cli(args: list[str] | None, run: bool = True):
    from lightning.pytorch.cli import LightningCLI

    from dualenc.data.datamodule import WebDataModule
    from dualenc.module import DualEncoderModule

    return LightningCLI(
        DualEncoderModule,
        WebDataModule,
        args=expand_config_args(args) if args is not None else None,
        run=run,
        auto_configure_optimizers=False,  # the module owns its optimizer (decay groups, schedule)
        save_config_kwargs={"overwrite": True},
    )


def cmd_export(argv: list[str]) -> int:
    """dualenc export --config CFG.yaml --ckpt_path X.ckpt --out DIR"""
    import torch

    from dualenc.export import export_model

    p = argparse.ArgumentParser(prog="dualenc export", description="Export a Lightning checkpoint's model "
                                "as safetensors + config, loadable with dualenc.export.load_model.")
    p.add_argument("--config", action="append", required=True, help="the training config(s)")
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cli_args = [x for c in a.config for x in ("--config", c)]
    cli = make_cli(cli_args, run=False)
    ckpt = torch.load(a.ckpt_path, map_location="cpu", weights_only=True)
    cli.model.load_state_dict(ckpt["state_dict"], strict=True)
    print(f"exported model to {export_model(cli.model.model, a.out)}")
    return 0


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


EXTRA: dict[str, Callable[[list[str]], int]] = {"export": cmd_export, "zeroshot": cmd_zeroshot}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA:
        return EXTRA[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print("dualenc {fit,validate,test,predict} --config CFG.yaml ...  (LightningCLI)\n"
              f"dualenc {{{','.join(EXTRA)}}} --help")
    make_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
