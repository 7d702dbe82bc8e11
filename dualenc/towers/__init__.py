"""Towers: one file per family behind the small interface in ``base``; chosen by name."""

from dualenc.registry import Registry
from dualenc.towers.base import ImageTower, TextTower, Tower
from dualenc.towers.image import TimmImageTower
from dualenc.towers.text import HFTextTower

TOWERS: Registry[type[Tower]] = Registry("tower")
TOWERS.register("timm", TimmImageTower)
TOWERS.register("hf", HFTextTower)


def tower_name(tower: Tower) -> str:
    """The registry name of a tower instance's class (used by export)."""
    for name in TOWERS.names():
        if TOWERS.get(name) is type(tower):
            return name
    raise KeyError(f"{type(tower).__name__} is not registered in TOWERS; register it to export it")


__all__ = ["TOWERS", "HFTextTower", "ImageTower", "TextTower", "TimmImageTower", "Tower", "tower_name"]
