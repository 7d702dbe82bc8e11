"""The ``dualenc`` command: LightningCLI (fit/validate/test/predict) plus extra subcommands.

Config files may start with ``__base__: other.yaml`` (relative to the file); the base is loaded
first and the file's keys override it, so each shipped config is a short override of base.yaml.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path
from typing import Callable

import yaml

BASE_KEY = "__base__"


def resolve_config(path: str | Path) -> list[str]:
    """``path`` and its ``__base__`` chain, base first: file paths, or YAML text with the key removed.

    A config without ``__base__`` is passed on as its path (LightningCLI then records it as is); one
    with it is passed as YAML text, which ``--config`` accepts too, so no temporary files are left.
    """
    chain: list[str] = []
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
        chain.append(str(current) if base is None else yaml.safe_dump(data, sort_keys=False))
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
            out += ["--config", f]
    return out


def make_cli(args: list[str], run: bool = True):
    from lightning.pytorch.cli import LightningCLI

    from dualenc.data.datamodule import WebDataModule
    from dualenc.module import DualEncoderModule

    return LightningCLI(
        DualEncoderModule,
        WebDataModule,
        args=expand_config_args(args or []),
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
    # Only the model is needed: no data, no accelerator, no strategy, no logs.
    cli_args += ["--data.train=null", "--data.val=null", "--trainer.accelerator=cpu", "--trainer.devices=1",
                 "--trainer.strategy=auto", "--trainer.logger=false", "--trainer.num_nodes=1"]
    cli = make_cli(cli_args, run=False)
    ckpt = torch.load(a.ckpt_path, map_location="cpu", weights_only=True)
    cli.model.load_state_dict(ckpt["state_dict"], strict=True)
    print(f"exported model to {export_model(cli.model.model, a.out)}")
    return 0


def extra_commands() -> dict[str, Callable[[list[str]], int]]:
    """Subcommands beside LightningCLI's: name -> ``main(argv) -> exit code``."""
    from dualenc.data_tools.cli import main as data_main
    from dualenc.eval.commands import COMMANDS as EVAL_COMMANDS
    from dualenc.index.commands import COMMANDS as INDEX_COMMANDS
    from dualenc.plugins.commands import COMMANDS as PLUGIN_COMMANDS

    return {"export": cmd_export, "data": functools.partial(data_main, prog="dualenc data"),
            **EVAL_COMMANDS, **PLUGIN_COMMANDS, **INDEX_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = extra_commands()
    if argv and argv[0] in extra:
        return extra[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print("dualenc {fit,validate,test,predict} --config CFG.yaml ...  (LightningCLI)\n"
              f"dualenc {{{','.join(extra)}}} --help")
    # LightningCLI warns when given args while sys.argv has some too; ours are sys.argv with the
    # __base__ chains expanded. sys.argv stays as it is: DDP relaunches the command from it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        # Our streams yield exactly len() batches across workers (each worker is configured apart).
        warnings.filterwarnings("ignore", message=".*IterableDataset` has `__len__` defined.*")
        make_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
