"""Collectives for distributed evaluation: ranks hold different numbers of rows, so gathers are padded.

Only tensors travel (no pickled objects). Every function is a collective: all ranks must call it,
in the same order. Without an initialized process group they are identities.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from dualenc.distributed import world_info


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0, rank order; row counts may differ (even be 0).

    Trailing shapes and dtypes must agree across ranks. The result is on ``x``'s device.
    """
    _, world = world_info()
    if world == 1:
        return x
    dev = _comm_device()
    local = x.to(dev).contiguous()
    counts_parts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(counts_parts, torch.tensor([local.shape[0]], dtype=torch.long, device=dev))
    counts = torch.cat(counts_parts)
    longest = int(counts.max())
    if longest == 0:
        return x
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, counts)]).to(x.device)


def gather_strings(items: list[str]) -> list[str]:
    """Every rank's strings (e.g. sample keys), rank order, as :func:`gather_rows` orders rows.

    Strings travel as zero-padded UTF-8 byte rows, padded to the longest on any rank."""
    _, world = world_info()
    if world == 1:
        return list(items)
    raw = [s.encode("utf-8") for s in items]
    width = int(gather_rows(torch.tensor([max(map(len, raw), default=0)], dtype=torch.long)).max())
    rows = torch.zeros(len(raw), max(width, 1), dtype=torch.uint8)
    for i, b in enumerate(raw):
        rows[i, : len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else rows[i, :0]
    return [bytes(r).rstrip(b"\0").decode("utf-8") for r in gather_rows(rows).tolist()]


def row_offset(n_local: int) -> int:
    """Where this rank's rows start in :func:`gather_rows`' result."""
    rank, world = world_info()
    if world == 1:
        return 0
    counts = gather_rows(torch.tensor([n_local], dtype=torch.long))
    return int(counts[:rank].sum())


def broadcast_values(values: Sequence[float] | None, n: int, src: int = 0) -> list[float] | None:
    """Rank ``src``'s ``n`` floats on every rank; ``None`` from ``src`` (it failed) is ``None`` everywhere."""
    rank, world = world_info()
    if world == 1:
        return None if values is None else list(values)
    buf = torch.zeros(n + 1, dtype=torch.float64, device=_comm_device())
    if rank == src and values is not None:
        if len(values) != n:
            raise ValueError(f"broadcast_values: {len(values)} values, expected {n}")
        buf[0] = 1.0
        buf[1:] = torch.tensor(list(values), dtype=torch.float64)
    dist.broadcast(buf, src)
    return buf[1:].tolist() if buf[0] == 1.0 else None


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` is True on every rank (lets all ranks stop together on an error)."""
    _, world = world_info()
    if world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.long, device=_comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
