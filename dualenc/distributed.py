"""Cross-rank helpers for contrastive training: who am I, and a differentiable all-gather.

Contrastive losses need every rank to score its local rows against the whole global batch, so
features are all-gathered. The gather must carry gradients back to the rank that produced each
row, otherwise a rank's features would only learn from its own loss term.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_info", "gather_with_grad", "gather_features"]


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is unavailable or not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _use_tensor_collectives(t: Tensor) -> bool:
    # The single-tensor collectives (all_gather_into_tensor / reduce_scatter_tensor) are the fast
    # path on NCCL; gloo lacks reduce-scatter, so CPU runs take the list/all-reduce fallback.
    return t.is_cuda and "nccl" in str(dist.get_backend()).lower()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward routes each slice's gradient to its owner rank."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = world_info()
        ctx.rank, ctx.world, ctx.local_n = rank, world, x.shape[0]
        x = x.contiguous()
        if _use_tensor_collectives(x):
            out = x.new_empty((world * x.shape[0], *x.shape[1:]))
            dist.all_gather_into_tensor(out, x)
            return out
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss may depend on this rank's rows, so the gradient for them is the sum
        # of all ranks' incoming gradients restricted to this rank's slice.
        grad = grad.contiguous()
        if _use_tensor_collectives(grad):
            out = grad.new_empty((ctx.local_n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        total = grad.clone()  # all_reduce is in place; never mutate autograd's buffer
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_n
        return total[start : start + ctx.local_n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    Every rank must pass a tensor of the same shape, dtype and device (not checked: a check
    would cost an extra collective on every step). Returns ``x`` itself when world size is 1.
    """
    _, world = world_info()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_features(image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor, int]:
    """(all_image, all_text, offset): the global batches and where this rank's rows start in them.

    Local batch sizes must be equal on all ranks (see :func:`gather_with_grad`).
    """
    rank, _ = world_info()
    offset = rank * image_features.shape[0]
    return gather_with_grad(image_features), gather_with_grad(text_features), offset
