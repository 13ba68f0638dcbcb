"""Autograd-aware collectives for contrastive losses across data-parallel ranks.

Gradient convention (used by every loss in ``losses.py``): each rank returns the *global* loss
``L`` and autograd treats the ``W`` ranks' copies as one objective ``sum_r L = W * L``. The
backward of each collective below is the exact adjoint for that objective, so the gradient that
reaches rank ``r``'s local features is ``W * dL/dx_r``. DistributedDataParallel then *averages*
parameter gradients over the ``W`` ranks, which divides the factor out again: every parameter
receives ``dL/dtheta``, the gradient of the single-process loss on the concatenated batch.

The helpers work on any backend (gloo, NCCL) and accept ranks whose local batches differ in size
(the last batch of an epoch without ``drop_last``). Only the default process group is used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(n_local: int, device: torch.device) -> list[int]:
    """The first-dimension size of every rank's tensor, in rank order."""
    if not is_distributed():
        return [n_local]
    local = torch.tensor([n_local], dtype=torch.long, device=device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's tensor along dim 0. Backward: sum the incoming gradients
    over ranks (every rank used every slice) and keep this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int]) -> Tensor:
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        largest = max(sizes)
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buffers, padded.contiguous())
        return torch.cat([buf[:n] for buf, n in zip(buffers, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, differentiable.

    ``sizes`` (from :func:`gather_sizes`) saves one collective when the caller already has them.
    Outside a process group this is the identity.
    """
    if not is_distributed():
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device)
    return _AllGather.apply(tensor, sizes)


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: every rank's output depends on every rank's input, so
    the gradient is the sum of the upstream gradients over ranks."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks, differentiable (identity outside a process group)."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def _exchange(send: Tensor, to_rank: int, recv: Tensor, from_rank: int) -> Tensor:
    ops = [
        dist.P2POp(dist.isend, send.contiguous(), to_rank),
        dist.P2POp(dist.irecv, recv, from_rank),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return recv


class _NeighbourExchange(torch.autograd.Function):
    """Forward: send to ``to_rank`` and receive from ``from_rank``. Backward: the same exchange in
    the opposite direction, so each gradient returns to the rank that sent the tensor."""

    @staticmethod
    def forward(ctx, tensor: Tensor, to_rank: int, from_rank: int, recv_rows: int) -> Tensor:
        ctx.to_rank, ctx.from_rank, ctx.send_rows = to_rank, from_rank, tensor.shape[0]
        recv = tensor.new_empty((recv_rows, *tensor.shape[1:]))
        return _exchange(tensor, to_rank, recv, from_rank)

    @staticmethod
    def backward(ctx, grad: Tensor):
        recv = grad.new_empty((ctx.send_rows, *grad.shape[1:]))
        return _exchange(grad, ctx.from_rank, recv, ctx.to_rank), None, None, None


def neighbour_exchange_with_grad(tensor: Tensor, to_rank: int, from_rank: int, recv_rows: int) -> Tensor:
    """Send ``tensor`` to ``to_rank`` and return the ``recv_rows``-row tensor sent by
    ``from_rank`` (same trailing shape), differentiable. One step of a ring pass."""
    return _NeighbourExchange.apply(tensor, to_rank, from_rank, recv_rows)
