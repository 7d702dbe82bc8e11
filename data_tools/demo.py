"""Deterministic synthetic image/alt-text dataset: one colored shape on a greyish background.

Classes are (color, shape) pairs. A fixed set of 24 of the 80 pairs never appears in train or
val, so zero-shot accuracy on ``heldout/`` measures compositional generalisation: every held-out
color and shape is seen in training, only the pairing is new. Train captions are noisy like web
alt-text (file names, boilerplate, ~10% captions of a different pair).
"""

from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .writer import ShardWriter, write_json_atomic

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 180),
    "orange": (250, 140, 0),
    "pink": (250, 130, 190),
    "cyan": (0, 210, 220),
    "brown": (130, 75, 25),
    "white": (245, 245, 245),
}
SHAPES: list[str] = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring"]
COLOR_NAMES: list[str] = list(COLORS)

# Zero-shot prompt templates (CLIP_benchmark layout); "the"/"small"/"large" avoid a/an issues.
TEMPLATES: list[str] = ["a photo of the {c}.", "the {c}.", "{c}.", "a small {c}.", "a large {c}.", "a picture of the {c}."]

SPLITS = ("train", "val", "heldout")
_SPLIT_CODE = {"train": 1, "val": 2, "heldout": 3}
_MIN_BG_DISTANCE = 70.0  # RGB distance every background keeps from every named shape color
_CAPTION_KINDS = ("clean", "filename", "boilerplate", "wrong")


def is_heldout(color_index: int, shape_index: int) -> bool:
    """Held-out rule. 3 is coprime with 10, so each shape gets exactly 3 held-out colors; the
    residues {0, 3, 6} are never adjacent, so each color gets 2 or 3 held-out shapes."""
    return (color_index * 3 + shape_index) % 10 in (0, 3, 6)


def class_name(color: str, shape: str) -> str:
    return f"{color} {shape}"


def combos() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(seen, heldout) lists of (color, shape), color-major order; checks the split's invariants."""
    seen, held = [], []
    for ci, color in enumerate(COLOR_NAMES):
        for si, shape in enumerate(SHAPES):
            (held if is_heldout(ci, si) else seen).append((color, shape))
    per_color = [sum(c == color for c, _ in held) for color in COLOR_NAMES]
    per_shape = [sum(s == shape for _, s in held) for shape in SHAPES]
    assert len(held) == 24 and all(2 <= n <= 3 for n in per_color) and all(n == 3 for n in per_shape)
    return seen, held


# -- rendering -------------------------------------------------------------------------------
def _polygon(shape: str, rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Unit-circle vertices for polygon shapes (None for circle/ring), randomly rotated."""
    if shape == "square":
        pts, rot = [(1, 1), (1, -1), (-1, -1), (-1, 1)], rng.uniform(-20, 20)  # limited: 45 deg = diamond
        pts = [(x / math.sqrt(2), y / math.sqrt(2)) for x, y in pts]
    elif shape == "diamond":
        pts, rot = [(0, 1), (0.6, 0), (0, -1), (-0.6, 0)], rng.uniform(-20, 20)
    elif shape == "triangle":
        pts, rot = [(math.cos(a), math.sin(a)) for a in np.radians([90, 210, 330])], rng.uniform(0, 360)
    elif shape == "hexagon":
        pts, rot = [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(0, 360, 60))], rng.uniform(0, 360)
    elif shape == "star":
        angles = np.radians(np.arange(90, 450, 36))
        radii = [1.0 if i % 2 == 0 else 0.45 for i in range(10)]
        pts, rot = [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)], rng.uniform(0, 360)
    elif shape == "cross":
        w = 0.32
        arm = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        s = 1 / math.hypot(1, w)  # arm corners must stay inside the unit circle
        pts, rot = [(x * s, y * s) for x, y in arm], rng.uniform(-25, 25)
    else:
        return None
    c, s_ = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    return [(x * c - y * s_, x * s_ + y * c) for x, y in pts]


def _background_color(rng: np.random.Generator) -> np.ndarray:
    """A desaturated dark/grey tint, kept far from every named shape color."""
    named = np.array(list(COLORS.values()), dtype=np.float32)
    while True:
        col = rng.uniform(25, 150) + rng.uniform(-8, 8, size=3)
        if np.linalg.norm(named - col, axis=1).min() >= _MIN_BG_DISTANCE:
            return col.astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    a = _background_color(rng)
    img = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    if rng.random() < 0.3:  # mild 2-color gradient in a random direction
        b = _background_color(rng)
        theta = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = (xs * math.cos(theta) + ys * math.sin(theta))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a + (b - a) * t[..., None]
    if rng.random() < 0.25:  # sensor-like noise
        img = img + rng.normal(0, rng.uniform(3, 7), size=img.shape).astype(np.float32)
    mean = float(img.mean())
    name = "dark" if mean < 70 else "dark grey" if mean < 105 else "grey"
    return img, name


def render_scene(color: str, shape: str, image_size: int, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Render one scene; returns the image and its attributes (size, position, background)."""
    S = image_size
    bg, bg_name = _background(S, rng)
    frac = float(rng.uniform(0.35, 0.8))  # diameter of the shape's bounding circle / image side
    r = frac * S / 2
    cx, cy = rng.uniform(r, S - r), rng.uniform(r, S - r)

    ss = 4 if S <= 64 else 2  # supersample the mask for anti-aliased edges
    mask = Image.new("L", (S * ss, S * ss), 0)
    draw = ImageDraw.Draw(mask)
    X, Y, R = cx * ss, cy * ss, r * ss
    pts = _polygon(shape, rng)
    if pts is not None:
        draw.polygon([(X + x * R, Y - y * R) for x, y in pts], fill=255)
    else:
        draw.ellipse([X - R, Y - R, X + R, Y + R], fill=255)
        if shape == "ring":
            Ri = R * 0.55
            draw.ellipse([X - Ri, Y - Ri, X + Ri, Y + Ri], fill=0)
    alpha = np.asarray(mask.reduce(ss), dtype=np.float32)[..., None] / 255.0

    fg = np.array(COLORS[color], dtype=np.float32) + rng.integers(-15, 16, size=(S, S, 3)).astype(np.float32)
    img = np.clip(bg * (1 - alpha) + fg * alpha, 0, 255).astype(np.uint8)

    horiz = "left" if cx < 0.4 * S else "right" if cx > 0.6 * S else ""
    vert = "top" if cy < 0.4 * S else "bottom" if cy > 0.6 * S else ""
    size_word = "small" if frac < 0.5 else "large" if frac > 0.65 else "medium"
    attrs = {
        "size": size_word,
        "size_frac": round(frac, 3),
        "position": " ".join(w for w in (vert, horiz) if w) or "center",
        "background": bg_name,
    }
    return Image.fromarray(img, "RGB"), attrs


# -- captions --------------------------------------------------------------------------------
def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position_phrase(position: str) -> str:
    if position == "center":
        return "in the middle"
    if " " in position:
        return f"in the {position} corner"
    return f"at the {position}" if position in ("top", "bottom") else f"on the {position}"


def _clean_caption(color: str, shape: str, attrs: dict[str, Any], rng: np.random.Generator) -> str:
    p = f"{color} {shape}"
    sized = p if attrs["size"] == "medium" else f"{attrs['size']} {p}"
    bg = attrs["background"]
    pos = _position_phrase(attrs["position"])
    templates = [
        f"{_a(p)} {p}",
        p,
        f"{_a(sized)} {sized}",
        f"{_a(sized)} {sized} on {_a(bg)} {bg} background",
        f"photo of {_a(sized)} {sized}",
        f"a picture of {_a(p)} {p} {pos}",
        f"the {p} {pos}",
        f"close up of {_a(p)} {p}",
        f"{p} icon",
        f"an image showing {_a(p)} {p} on {_a(bg)} {bg} background",
    ]
    return templates[rng.integers(len(templates))]


_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december"]


def _filename_caption(color: str, shape: str, rng: np.random.Generator) -> str:
    n = int(rng.integers(0, 10000))
    templates = [
        f"IMG_{n:04d} {color} {shape}.jpg",
        f"{color}_{shape}_{n:04d}.png",
        f"file {color} {shape} {rng.integers(2005, 2024)} {rng.integers(1, 13):02d} jpg",
        f"DSC{n:05d} {color} {shape}",
        f"{color}-{shape}-{int(rng.integers(0, 1 << 32)):08x}.jpg",
    ]
    return templates[rng.integers(len(templates))]


def _boilerplate_caption(color: str, shape: str, rng: np.random.Generator) -> str:
    p = f"{color} {shape}"
    h, m, s = rng.integers(0, 24), rng.integers(0, 60), rng.integers(0, 60)
    date = f"{rng.integers(1, 29)} {_MONTHS[rng.integers(12)]} {rng.integers(2005, 2024)}"
    templates = [
        f"thumbnail for version as of {h:02d} {m:02d} {s:02d} {date} {p}",
        f"stock photo {p}",
        f"{p} stock illustration vector royalty free",
        f"download {p} free hd wallpaper",
        f"{p} | buy online at best price",
        f"clipart {p} free download",
    ]
    return templates[rng.integers(len(templates))]


def _train_caption(
    color: str, shape: str, attrs: dict[str, Any], seen: list[tuple[str, str]], kind: str, rng: np.random.Generator
) -> tuple[str, str]:
    """Return (caption, class name the caption describes)."""
    if kind == "wrong":
        # Another *seen* pair, so held-out pair names never occur in training text.
        others = [c for c in seen if c != (color, shape)]
        color, shape = others[rng.integers(len(others))]
        kind = ("clean", "filename", "boilerplate")[rng.integers(3)]
    if kind == "clean":
        text = _clean_caption(color, shape, attrs, rng)
    elif kind == "filename":
        text = _filename_caption(color, shape, rng)
    else:
        text = _boilerplate_caption(color, shape, rng)
    return text, class_name(color, shape)


# -- dataset ---------------------------------------------------------------------------------
def _write_split(
    split: str,
    out: Path,
    classes: list[tuple[str, str]],
    seen: list[tuple[str, str]],
    n: int,
    *,
    image_size: int,
    shard_size: int,
    seed: int,
    kind_probs: list[float],
) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    # Balanced classes in random order.
    labels = rng.permutation(np.arange(n) % len(classes))
    kinds: dict[str, int] = {k: 0 for k in _CAPTION_KINDS} if split == "train" else {"clean": 0}
    split_dir = out / split
    with ShardWriter(split_dir, max_count=shard_size) as writer:
        for i, label in enumerate(labels.tolist()):
            color, shape = classes[label]
            image, attrs = render_scene(color, shape, image_size, rng)
            if split == "train":
                kind = _CAPTION_KINDS[rng.choice(4, p=kind_probs)]
                caption, about = _train_caption(color, shape, attrs, seen, kind, rng)
            else:
                kind, caption, about = "clean", f"{_a(color)} {color} {shape}", class_name(color, shape)
            kinds[kind] += 1
            buf = io.BytesIO()
            # 4:4:4 chroma: at 48 px, subsampling would visibly smear the shape's color.
            image.save(buf, format="JPEG", quality=95, subsampling=0)
            meta = {"color": color, "shape": shape, **attrs, "caption_kind": kind, "caption_about": about}
            writer.write(f"{split}_{i:07d}", buf.getvalue(), caption, extra={"cls": label, "json": meta})
    names = [class_name(c, s) for c, s in classes]
    (split_dir / "classnames.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (split_dir / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    return {
        "samples": n,
        "classes": len(classes),
        "shards": [Path(p).name for p in writer.shards],
        "caption_kinds": kinds,
    }


def build_demo(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 12000,
    n_val: int = 1000,
    n_heldout: int = 1200,
    image_size: int = 48,
    shard_size: int = 2000,
    seed: int = 0,
    wrong_caption_rate: float = 0.1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the demo dataset under ``out_dir`` and return its summary (also in ``demo.json``).

    The whole dataset is built in a hidden sibling directory and renamed into place at the end,
    so an interrupted build never leaves a partial dataset under ``out_dir``.
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_heldout", n_heldout)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not 0.0 <= wrong_caption_rate < 1.0:
        raise ValueError(f"wrong_caption_rate must be in [0, 1), got {wrong_caption_rate}")
    out = Path(out_dir)
    _check_target(out, overwrite)

    seen, held = combos()
    # Clean/filename/boilerplate keep their 55:20:15 ratio in whatever is not a wrong caption.
    rest = 1.0 - wrong_caption_rate
    kind_probs = [rest * 55 / 90, rest * 20 / 90, rest * 15 / 90, wrong_caption_rate]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        common = dict(image_size=image_size, shard_size=shard_size, seed=seed, kind_probs=kind_probs)
        splits = {
            "train": _write_split("train", tmp, seen, seen, n_train, **common),
            "val": _write_split("val", tmp, seen, seen, n_val, **common),
            "heldout": _write_split("heldout", tmp, held, seen, n_heldout, **common),
        }
        classes = {
            "colors": COLOR_NAMES,
            "shapes": SHAPES,
            "heldout": [class_name(*c) for c in held],
            "seen": [class_name(*c) for c in seen],
        }
        write_json_atomic(tmp / "classes.json", classes)
        summary = {
            "seed": seed,
            "image_size": image_size,
            "shard_size": shard_size,
            "wrong_caption_rate": wrong_caption_rate,
            "splits": splits,
            "classes": {"seen": len(seen), "heldout": len(held)},
        }
        write_json_atomic(tmp / "demo.json", summary)
        _check_target(out, overwrite)  # may have appeared while building
        if out.exists():
            if any(out.iterdir()):
                shutil.rmtree(out)  # _check_target made sure this is an old demo dir
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (CLI: --overwrite) or choose another directory")
    if not (out / "demo.json").is_file():
        raise FileExistsError(
            f"{out} is not empty and has no demo.json, so it is not an old demo build; refusing to delete it. "
            "Choose another directory"
        )
