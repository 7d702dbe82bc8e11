"""The shipped CLIP prompt lists: 80 ImageNet templates and OpenAI's 1000 curated ImageNet class names."""

from __future__ import annotations

from pathlib import Path

from dualenc.eval.zeroshot import check_templates, read_lines

ASSETS = Path(__file__).with_name("assets")
BUILTIN = "imagenet"  # the name that selects a shipped list instead of a file


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates (``{c}`` marks the class name)."""
    return read_lines(ASSETS / "imagenet_templates.txt")


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names as curated by OpenAI for CLIP, in class-index order.

    (As in CLIP's list, "missile" and "sunglasses" each name two classes.)
    """
    return read_lines(ASSETS / "imagenet_classnames.txt")


def load_classnames(value: str | Path) -> list[str]:
    """Class names from a file (one per line), or ``imagenet`` for the shipped list."""
    if str(value) == BUILTIN and not Path(value).exists():  # a real file of that name wins
        return imagenet_classnames()
    return _read(value, "class names")


def load_templates(value: str | Path) -> list[str]:
    """Templates from a file (one per line, each with ``{c}``), or ``imagenet`` for CLIP's 80."""
    if str(value) == BUILTIN and not Path(value).exists():
        return imagenet_templates()
    templates = _read(value, "prompt templates")
    try:
        check_templates(templates)
    except ValueError as e:
        raise ValueError(f"{value}: {e}") from None
    return templates


def _read(path: str | Path, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(p)!r} does not exist; give a text file with one entry per "
                                f"line, or '{BUILTIN}' for the shipped list")
    lines = read_lines(p)
    if not lines:
        raise ValueError(f"{what} file {str(p)!r} is empty; it needs one entry per line")
    return lines
