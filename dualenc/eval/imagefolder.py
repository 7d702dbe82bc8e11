"""Image folders: ``root/<class>/*.jpg`` for zero-shot, or any tree of images for embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dualenc.data.transforms import image_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(root: str | Path) -> list[Path]:
    """All images under ``root`` (recursively), sorted, so shard contents are stable across runs."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    return sorted(p for p in root.rglob("*") if is_image(p))


def find_classes(root: str | Path) -> list[str]:
    """Sorted class subfolder names; every class must hold at least one image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class subfolders; expected root/<class name>/<image>")
    empty = [c for c in classes if not any(is_image(p) for p in (root / c).rglob("*"))]
    if empty:
        raise ValueError(f"image folder {str(root)!r}: class folder(s) {empty} hold no image "
                         f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
    return classes


def folder_classnames(root: str | Path) -> list[str]:
    """Prompt names for the classes: ``classnames.txt`` in ``root`` if present (one per class folder,
    in sorted folder order), else the folder names with ``_`` read as spaces."""
    classes = find_classes(root)
    listed = Path(root) / "classnames.txt"
    if listed.is_file():
        names = [ln.strip() for ln in listed.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) != len(classes):
            raise ValueError(f"{listed} lists {len(names)} class names but {root} has {len(classes)} class "
                             "folders; give one name per folder (sorted folder order)")
        return names
    return [c.replace("_", " ") for c in classes]


class ImageFolderDataset(Dataset):
    """Images of a folder as ``{"image", "key", "label"}`` samples (``label`` = class index, or -1).

    Unreadable images yield ``{"key", "skipped": True}`` so one bad file does not stop an evaluation;
    :func:`collate_images` drops them and reports their keys.
    """

    def __init__(self, root: str | Path, transform: Callable, labelled: bool = True,
                 files: list[Path] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        if labelled:
            self.classes = find_classes(self.root)
            self.samples = [(p, i) for i, c in enumerate(self.classes) for p in list_images(self.root / c)]
        else:
            self.classes = []
            self.samples = [(p, -1) for p in (files if files is not None else list_images(self.root))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        key = path.relative_to(self.root).as_posix()
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception:  # noqa: BLE001 - any decoder failure means an unreadable image
            return {"key": key, "skipped": True}
        return {"image": self.transform(image), "key": key, "label": label}


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch like ``eval_loader``'s (``image``, ``key``, ``label``, ``text``) plus ``skipped_keys``."""
    good = [s for s in samples if not s.get("skipped")]
    batch: dict[str, Any] = {
        "key": [s["key"] for s in good],
        "text": [None] * len(good),
        "skipped_keys": [s["key"] for s in samples if s.get("skipped")],
    }
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["label"] = torch.tensor([s["label"] for s in good])
    return batch


def image_folder_loader(root: str | Path, data_config: dict[str, Any], batch_size: int = 256, num_workers: int = 2,
                        labelled: bool = True, rank: int = 0, world: int = 1,
                        files: list[Path] | None = None) -> DataLoader:
    """Ordered batches of ``root`` with the model's eval transform; rank ``rank`` of ``world`` gets
    every ``world``-th image (disjoint parts for distributed evaluation)."""
    ds = ImageFolderDataset(root, image_transform(data_config, train=False), labelled=labelled, files=files)
    if len(ds) == 0:
        raise ValueError(f"image folder {str(root)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    part = torch.utils.data.Subset(ds, range(rank, len(ds), world)) if world > 1 else ds
    return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_images, persistent_workers=False)
