"""Collectives over the processes of a distributed run that are no-ops in a single process: the quantizers and the
semi-discrete solver call them unconditionally, so one code path serves one process and many."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """The processes of the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType | None = None) -> torch.Tensor:
    """`tensor` reduced in place over processes (a sum unless `op` says otherwise); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


def broadcast_from_first(tensor: torch.Tensor) -> torch.Tensor:
    """Process 0's `tensor` on every process, in place (a random draw made the same everywhere); returns it."""
    if world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process, in process order (row counts may differ); this process's rows alone when single."""
    if world_size() == 1:
        return rows
    sizes = [torch.zeros((), dtype=torch.long, device=rows.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(rows.shape[0], device=rows.device))
    longest = int(max(sizes))
    padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes)])
