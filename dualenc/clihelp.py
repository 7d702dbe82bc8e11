"""argparse help that shows each option's default, for every dualenc and dualenc-data subcommand."""

from __future__ import annotations

import argparse
import copy


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option that has a real default.

    Unlike argparse's own, options whose help already states a default, flags (default False) and
    options without one (None) are left alone: "(default: None)" says nothing.
    """

    @staticmethod
    def _has_default(action: argparse.Action) -> bool:
        return bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS, [])

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._has_default(action) or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._has_default(action):  # argparse prints no help line for these
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class DefaultsParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose help (and its subcommands' help) shows the defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):  # type: ignore[override]
        kwargs.setdefault("parser_class", DefaultsParser)
        return super().add_subparsers(**kwargs)
