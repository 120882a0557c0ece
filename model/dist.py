"""
Data-parallel training under torchrun (`torchrun --standalone --nproc_per_node N script.py ...`): N processes
("ranks"), each with a copy of the models, each training on its share of every batch. Without torchrun (no
WORLD_SIZE in the environment) every function here is a no-op and a run is exactly a one-process run.

- init() joins the job torchrun started: NCCL with one GPU per rank (cuda:LOCAL_RANK) on CUDA, gloo on the
  CPU. The other ranks' stdout goes to /dev/null, so every line is printed once, by rank 0.
- model/train.py does the batch math: every rank draws the whole (seed, step) batch and keeps its rows
  (shard), divides by the whole batch's count of real targets, and all_reduce_grads sums the gradients once
  per optimizer step, after the last micro-batch. So N ranks x B/N rows step exactly like one process x B.
- Only rank 0 writes (checkpoints, logs, reports). A one-time file (the tokenizer, the top-k cache, the
  teacher's answers) is built inside main_first(): rank 0 builds it while the others wait, then they find it
  built and read it. A missing teacher is pretrained by all ranks, like a student (model/teachers.py).
"""

import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as td


def world_size() -> int:
    """The number of ranks torchrun started (its WORLD_SIZE), 1 without torchrun. Read from the environment,
    so it is known before init(), when the flags are checked."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """Rank 0, the one that prints and writes; always true without torchrun."""
    return rank() == 0


def init(device: str) -> str:
    """Join the torchrun job, if there is one, and return the device this rank trains on: cuda:LOCAL_RANK
    for a CUDA device (one GPU per rank), else `device` itself (the CPU: model/cli.py resolve_device turns
    away MPS, which neither backend serves). The timeout is 2 h, not the default (gloo's 30 min, NCCL's
    10), because the ranks wait at a barrier while rank 0 alone builds a top-k cache or the teacher's
    answers, or writes the final report, which can take longer than that on a CPU."""
    if world_size() == 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        # NCCL bound to this rank's GPU, so that its barriers know which device to use
        td.init_process_group("nccl", timeout=timedelta(hours=2), device_id=torch.device(device))
    else:
        td.init_process_group("gloo", timeout=timedelta(hours=2))
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # open for the life of the process
    return device


def barrier():
    if td.is_initialized():
        td.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first; the others run it after rank 0 has left it. For files built once and
    read by all: rank 0 builds what is missing, the others then find it and load it. The block must not
    use collectives (rank 0 runs it alone). If rank 0 fails in it, it exits and torchrun stops the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch: rows [r*b, (r+1)*b) with b = B / world_size."""
    n = world_size()
    if n == 1:
        return t
    b = t.size(0) // n
    return t[rank() * b:(rank() + 1) * b]


def broadcast_(tensors):
    """Copy rank 0's values into every rank's tensors (as DDP does with the weights when it starts)."""
    if world_size() > 1:
        with torch.no_grad():
            for t in tensors:
                td.broadcast(t, src=0)


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sums over the ranks of same-shaped tensors (e.g. loss figures), in one all-reduce."""
    if world_size() == 1:
        return tensors
    flat = torch.stack(tensors)
    td.all_reduce(flat)
    return list(flat.unbind())


def all_reduce_grads(params):
    """Sum the parameters' gradients over the ranks, as one flat buffer in one all-reduce. Summed, not
    averaged: each rank's loss is already divided by the count of real targets of the whole batch (all ranks'),
    so the sum is the gradient of the whole batch's mean loss. Every rank must hold the same set of gradients."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    td.all_reduce(flat)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


def cleanup():
    """Leave the torchrun job (a no-op without one)."""
    if td.is_initialized():
        td.destroy_process_group()
