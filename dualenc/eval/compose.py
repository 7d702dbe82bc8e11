"""Composed queries (ALIGN's image + text arithmetic): ``normalize(image + sum_i w_i * text_i)``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dualenc.data.transforms import image_transform
from dualenc.eval.encode import encode_texts
from dualenc.eval.retrieval import topk_search
from dualenc.model import DualEncoder


def compose_query(image_emb: Tensor, text_embs: Tensor, weights: float | Sequence[float] = 1.0) -> Tensor:
    """``normalize(image_emb + sum_i weights[i] * text_embs[i])``; a negative weight subtracts a concept.

    ``image_emb`` is (D,) or (1, D); ``text_embs`` (T, D) or (D,); one weight, or one per text.
    Returns (1, D).
    """
    img = image_emb.reshape(1, -1).float()
    txt = text_embs.reshape(-1, text_embs.shape[-1]).float()
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding sizes differ: image {img.shape[1]}, text {txt.shape[1]}; use one model for both")
    w = torch.as_tensor([weights] * txt.shape[0] if isinstance(weights, (int, float)) else list(weights),
                        dtype=torch.float32)
    if w.shape[0] != txt.shape[0]:
        raise ValueError(f"{w.shape[0]} weight(s) for {txt.shape[0]} text(s); give one weight, or one per text")
    q = img + (w[:, None] * txt).sum(0, keepdim=True)
    if float(q.norm()) < 1e-6:
        raise ValueError("the composed query is the zero vector (the texts cancel the image); change the weights")
    return F.normalize(q, dim=-1)


def nearest(query: Tensor, gallery: Tensor, k: int = 5, exclude: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """(scores, indices) of the ``k`` gallery rows closest to each query row, best first.

    ``exclude``: gallery rows never to return (e.g. the query image itself).
    """
    if gallery.ndim != 2 or query.shape[-1] != gallery.shape[1]:
        raise ValueError(f"embedding sizes differ: query dim {query.shape[-1]}, gallery {tuple(gallery.shape)}; "
                         "the gallery must be embedded with the same model")
    extra = len(set(exclude))
    scores, idx = topk_search(query.reshape(-1, gallery.shape[1]), gallery, k + extra)
    if extra:
        keep = ~torch.isin(idx, torch.as_tensor(sorted(set(exclude))))
        rows = [(s[m][:k], i[m][:k]) for s, i, m in zip(scores, idx, keep)]
        scores, idx = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    return scores, idx


@torch.no_grad()
def embed_image_file(model: DualEncoder, path: str | Path, device: torch.device | str = "cpu") -> Tensor:
    """(1, D) normalized embedding of one image file, with the model's eval transform."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {str(p)!r} does not exist")
    try:
        with Image.open(p) as im:
            image = im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read image {str(p)!r}: {e}") from e
    x = image_transform(model.image_tower.data_config, train=False)(image).unsqueeze(0)
    return model.encode_image(x.to(device)).float().cpu()


@torch.no_grad()
def composed_query(model: DualEncoder, image: str | Path, texts: Sequence[str], weights: float | Sequence[float],
                   device: torch.device | str = "cpu") -> Tensor:
    """Embed an image file and texts with ``model`` and compose them (see :func:`compose_query`)."""
    if not texts:
        raise ValueError("give at least one text to add to (or, with a negative weight, subtract from) the image")
    img = embed_image_file(model, image, device)
    txt = encode_texts(model, model.text_tower.tokenizer_fn(), list(texts), device)
    return compose_query(img, txt, weights)
