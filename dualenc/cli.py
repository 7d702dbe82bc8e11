"""The ``dualenc`` command: LightningCLI (fit/validate/test/predict) plus extra subcommands.

Config files may start with ``__base__: other.yaml`` (relative to the file); the base is loaded
first and the file's keys override it, so each shipped config is a short override of base.yaml.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import yaml

from dualenc.clihelp import DefaultsParser
from dualenc.errors import ConfigError, UserError, message, pop_debug, run_guarded

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
            raise ConfigError(f"config {current} is part of a {BASE_KEY} cycle")
        if not current.is_file():
            raise FileNotFoundError(f"config file {str(current)!r} does not exist; check --config")
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


def _rank_zero_process() -> bool:
    """Whether this process is global rank 0 (DDP re-launches the command with these set)."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


# LightningCLI's ckpt_path also takes these names, which are not files.
_CKPT_NAMES = ("last", "best", "hpc", "registry")


def default_loggers(root: str) -> list:
    """The loggers of a config that names none: CSV (``metrics.csv``, read by ``dualenc report``) under
    ``root/lightning_logs``, plus TensorBoard under ``root/tensorboard`` when ``tensorboard`` is installed.

    Lightning's own default is one or the other depending on what is installed; this keeps the CSV
    file (and checkpoint folder) where it always was.
    """
    import importlib.util

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(root)]
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        loggers.append(TensorBoardLogger(root, name="tensorboard"))
    return loggers


def _cli_class() -> type:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from dualenc.checkpoint import AtomicCheckpointIO, check_checkpoint

    class DualencCLI(LightningCLI):
        """LightningCLI with dualenc's run conventions: config errors as user errors, atomic
        checkpoints, incomplete checkpoints named before loading, one fit per output folder, and
        ``predict`` writing embeddings even when the config has no prediction writer."""

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, KeyError, MisconfigurationException) as e:
                if isinstance(e, UserError):
                    raise
                # Raised while building what the config describes: the config is what needs fixing.
                raise ConfigError(f"bad config: {message(e)}") from e

        def _check_ckpt(self) -> None:
            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            if ckpt and str(ckpt) not in _CKPT_NAMES:
                check_checkpoint(ckpt)

        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyperparameters right after parsing (torch.load: a bare
            # EOFError on an empty file). Not a public hook: if it goes away, _before still checks.
            self._check_ckpt()
            super()._parse_ckpt_path()

        def _before(self) -> None:
            self._check_ckpt()
            if self.config[self.subcommand]["trainer"].get("logger") in (None, True):
                self.trainer.loggers = default_loggers(self.trainer.default_root_dir)
            strategy = self.trainer.strategy
            if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a user's own is kept
                strategy.checkpoint_io = AtomicCheckpointIO()

        def before_fit(self) -> None:
            self._before()
            if _rank_zero_process():
                from dualenc.runlock import RunLock

                self._lock = RunLock(self.trainer.default_root_dir).acquire()
                atexit.register(self._lock.release)

        def after_fit(self) -> None:
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.release()

        def before_validate(self) -> None:
            self._before()

        def before_test(self) -> None:
            self._before()

        def before_predict(self) -> None:
            from lightning.pytorch.callbacks import BasePredictionWriter

            from dualenc.callbacks import PredictionWriter

            self._before()
            if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(PredictionWriter())
            kwargs = self.config_init[self.subcommand]
            if kwargs.get("return_predictions") is None:  # the writer has them on disk: none kept in memory
                kwargs["return_predictions"] = False

    return DualencCLI


def make_cli(args: list[str], run: bool = True):
    from dualenc.data.datamodule import WebDataModule
    from dualenc.module import DualEncoderModule

    return _cli_class()(
        DualEncoderModule,
        WebDataModule,
        args=expand_config_args(args or []),
        run=run,
        auto_configure_optimizers=False,  # the module owns its optimizer (decay groups, schedule)
        save_config_kwargs={"overwrite": True},
    )


def cmd_export(argv: list[str]) -> int:
    """dualenc export (--config CFG.yaml --ckpt_path X.ckpt | --model EXPORT_DIR) --out DIR [--format open_clip]"""
    from dualenc.checkpoint import load_checkpoint_file
    from dualenc.export import export_model

    p = DefaultsParser(prog="dualenc export", description="Export a Lightning checkpoint's model (or "
                       "convert a dualenc export) as safetensors + config: dualenc's format "
                       "(dualenc.export.load_model) or open_clip's (open_clip.create_model_and_transforms("
                       "'local-dir:DIR')).")
    p.add_argument("--config", action="append", help="the training config(s)")
    p.add_argument("--ckpt_path")
    p.add_argument("--model", help="instead of --config/--ckpt_path: a dualenc export directory to convert")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("dualenc", "open_clip"), default="dualenc")
    p.add_argument("--allow-crop-change", action="store_true", help="open_clip: export a model evaluated at "
                   "crop_pct < 1 anyway (open_clip's transforms crop at 1.0)")
    a = p.parse_args(argv)
    if a.model:
        if a.config or a.ckpt_path:
            p.error("give --model (an export) or --config with --ckpt_path, not both")
        from dualenc.export import load_model

        model = load_model(a.model)
    else:
        if not (a.config and a.ckpt_path):
            p.error("give --config and --ckpt_path (or --model EXPORT_DIR)")
        cli_args = [x for c in a.config for x in ("--config", c)]
        # Only the model is needed: no data, no accelerator, no strategy, no logs.
        cli_args += ["--data.train=null", "--data.val=null", "--trainer.accelerator=cpu", "--trainer.devices=1",
                     "--trainer.strategy=auto", "--trainer.logger=false", "--trainer.num_nodes=1"]
        cli = make_cli(cli_args, run=False)
        ckpt = load_checkpoint_file(a.ckpt_path)
        cli.model.load_state_dict(ckpt["state_dict"], strict=True)
        model = cli.model.model
    if a.format == "open_clip":
        from dualenc.interop.open_clip import export_open_clip

        out = export_open_clip(model, a.out, allow_crop_change=a.allow_crop_change)
        print(f"exported model to {out} (open_clip: open_clip.create_model_and_transforms('local-dir:{out}'), "
              f"open_clip.get_tokenizer('local-dir:{out}'))")
    else:
        print(f"exported model to {export_model(model, a.out)}")
    return 0


def extra_commands() -> dict[str, Callable[[list[str]], int]]:
    """Subcommands beside LightningCLI's: name -> ``main(argv) -> exit code``."""
    from dualenc.data_tools.cli import main as data_main
    from dualenc.eval.commands import COMMANDS as EVAL_COMMANDS
    from dualenc.eval.image_commands import COMMANDS as IMAGE_COMMANDS
    from dualenc.index.commands import COMMANDS as INDEX_COMMANDS
    from dualenc.plugins.commands import COMMANDS as PLUGIN_COMMANDS

    return {"export": cmd_export, "data": functools.partial(data_main, prog="dualenc data"),
            **EVAL_COMMANDS, **IMAGE_COMMANDS, **PLUGIN_COMMANDS, **INDEX_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    argv, debug = pop_debug(list(sys.argv[1:] if argv is None else argv))
    extra = extra_commands()
    if argv and argv[0] in extra:
        # Besides UserError, a ValueError from a subcommand is a bad argument (as in dualenc-data).
        return run_guarded(f"dualenc {argv[0]}", lambda: extra[argv[0]](argv[1:]), debug, extra=(ValueError,))
    if argv and argv[0] in ("-h", "--help"):
        print("dualenc {fit,validate,test,predict} --config CFG.yaml ...  (LightningCLI)\n"
              f"dualenc {{{','.join(extra)}}} --help\n"
              "--debug (or DUALENC_DEBUG=1): show the traceback of an error a user caused")

    def run() -> int:
        # LightningCLI warns when given args while sys.argv has some too; ours are sys.argv with the
        # __base__ chains expanded. sys.argv stays as it is: DDP relaunches the command from it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            # Our streams yield exactly len() batches across workers (each worker is configured apart).
            warnings.filterwarnings("ignore", message=".*IterableDataset` has `__len__` defined.*")
            # predict's loader is ordered shards, not a sampler; the writer does not need batch indices.
            warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
            make_cli(argv)
        return 0

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    command = argv[0] if argv and not argv[0].startswith("-") else "fit"
    # Lightning raises MisconfigurationException for settings that cannot work together (the user's).
    return run_guarded(f"dualenc {command}", run, debug, extra=(MisconfigurationException,))


if __name__ == "__main__":
    sys.exit(main())
