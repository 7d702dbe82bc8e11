"""Gradient cache: a contrastive batch larger than activation memory, with full-batch gradients.

(Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021.)
1. embed the batch chunk by chunk without building graphs; 2. compute the loss on those cached
embeddings and its gradient with respect to them; 3. re-embed each chunk with a graph and push the
cached gradient through it. Parameter gradients equal the full-batch ones; activation memory is
one chunk's. Dropout draws the same masks in both passes because each chunk's RNG state is replayed.
BatchNorm sees per-chunk statistics (and updates running stats twice): use it with LayerNorm towers,
or frozen BatchNorm, when exact equality matters.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dualenc.model import DualEncoder


class _Rng:
    """Captures the CPU and CUDA RNG states so a chunk's forward can be replayed bit for bit."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def grad_cache_backward(
    model: DualEncoder,
    images: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    chunks: int,
    loss_fn: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor],
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> Tensor:
    """Accumulate into ``.grad`` the gradients of ``loss_fn(img, txt, scale, bias)``; returns the loss.

    ``backward(tensor)`` runs a backward pass (Lightning passes ``manual_backward`` so precision
    plugins scale it).
    """
    img_chunks = images.chunk(chunks)
    txt_chunks = list(zip(input_ids.chunk(chunks), attention_mask.chunk(chunks)))
    img_rng, txt_rng = [], []
    with torch.no_grad():
        img_parts, txt_parts = [], []
        for x in img_chunks:
            img_rng.append(_Rng())
            img_parts.append(model.encode_image(x))
        for ids, mask in txt_chunks:
            txt_rng.append(_Rng())
            txt_parts.append(model.encode_text(ids, mask))
    after = _Rng()
    img = torch.cat(img_parts).detach().requires_grad_(True)
    txt = torch.cat(txt_parts).detach().requires_grad_(True)
    loss = loss_fn(img, txt, model.scale(), model.logit_bias)
    backward(loss)  # gradients for the cached embeddings, the temperature and the bias
    img_grads = img.grad.split([len(c) for c in img_chunks])
    txt_grads = txt.grad.split([len(ids) for ids, _ in txt_chunks])
    for x, g, rng in zip(img_chunks, img_grads, img_rng):
        rng.restore()
        backward((model.encode_image(x) * g).sum())
    for (ids, mask), g, rng in zip(txt_chunks, txt_grads, txt_rng):
        rng.restore()
        backward((model.encode_text(ids, mask) * g).sum())
    after.restore()  # leave the RNG where a plain step would have left it
    return loss.detach()
