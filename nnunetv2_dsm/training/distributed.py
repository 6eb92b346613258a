"""Data-parallel training (``nnUNetv2_train … -num_gpus N``): a loss that weighs like one process, rank helpers.

nnU-Net splits the planned batch over the ranks and wraps the network in ``DistributedDataParallel``, which
*averages* the gradients of the ranks. The partial-label loss is a mean over the annotated (case, class) pairs.
Taken per rank, that mean gives every pair of a rank with few pairs a larger weight: with one case per GPU, a
case annotating one class (CHAOS, LiTS, MSD spleen) would weigh as much as a fully labelled case with 25 classes.

:func:`global_pair_normalizer` fixes that: each rank divides its *sum* over its own pairs by
``global count / world size``. DDP's average over the ranks then gives Σ_ranks sum_r / global count, the mean
over all pairs of the global batch, which is what one process computes on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group (nnU-Net's DDP training, or a test's gloo group)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks; 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank; 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


def is_rank0() -> bool:
    """True on the rank that writes files and logs (and always outside a process group)."""
    return rank() == 0


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks (a new tensor, outside autograd); ``x`` itself outside a process group.
    A collective: every rank must call it the same number of times, in the same order."""
    if not is_distributed():
        return x
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def global_pair_normalizer(local_count: torch.Tensor) -> torch.Tensor:
    """The divisor for a rank's sum over its annotated pairs: (count over all ranks) / world size, so that DDP's
    mean of the ranks' gradients equals the gradient of the mean over every pair of the global batch.
    ``local_count``: this rank's number of pairs (a tensor on the device the collective runs on: CUDA for NCCL).
    Outside a process group this is ``local_count`` itself (a plain mean). A collective (see :func:`global_sum`)."""
    return global_sum(local_count.to(torch.float32)) / world_size()
