"""One training run over several processes, started by `torchrun` (NCCL on CUDA, gloo on CPU).

    torchrun --nproc-per-node 4 -m xraygan train-gan DATA/train --out runs/gan ...

`--batch-size` stays the whole batch: each of the N processes takes its 1/N share of every batch
(the same images, noise and augmentation a single process would draw, since every process draws
the whole batch's random numbers from the same seeded streams and keeps its slice). Gradients
are averaged over the processes after each backward pass, so the update is the single-process
update up to batch-norm statistics, which each process computes over its own share (see
`setup`). Only rank 0 writes files; checkpoints are in the single-process format, so a run
trained on N processes resumes on M.

Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from xraygan.errors import InputError
from xraygan.runtime import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's slice of a whole-batch tensor (dimension 0)."""
        if not self.active:
            return batch
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def check_batch(self, batch_size: int) -> None:
        if self.active and (batch_size % self.world or batch_size // self.world < 2):
            raise InputError(f"--batch-size {batch_size}: must split into {self.world} equal shares of at "
                             f"least 2 images (one per process under torchrun); use a multiple of "
                             f"{self.world}")


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """The process group and this process's device. Under torchrun each process gets GPU
    LOCAL_RANK (NCCL) or the CPU (gloo).

    Batch norm stays per process (not SyncBatchNorm): at the batch sizes used here each share is
    16+ images, enough for stable statistics, and SyncBatchNorm would add a collective to every
    batch-norm layer of every forward pass (the GAN step runs D three times), which on gloo
    costs more than it buys. DDP's default is the same.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(f"torchrun started {local + 1}+ processes on this machine but it has "
                             f"{torch.cuda.device_count()} GPUs (give --nproc-per-node at most that)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "mps":
        raise InputError("torchrun with --device mps is not supported (one MPS device per machine); "
                         "run without torchrun")
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Dist(rank, world), device


@contextlib.contextmanager
def session(device_name: str, batch_size: int) -> Iterator[tuple[Dist, torch.device]]:
    """A trainer's processes, from `setup` to `shutdown`: the whole batch must split evenly, and
    every process has passed this point (its checks of the run folder come first) before any of
    them goes on, so rank 0 never makes or replaces a folder another process is still checking."""
    d, device = setup(device_name)
    try:
        d.check_batch(batch_size)
        barrier(d)
        yield d, device
        # every process has finished (rank 0 has written its last files) before any of them tears
        # down its connections: a rank that left first once aborted in gloo's teardown (SIGABRT,
        # "terminate called without an active exception"). Not after an error: the others may be gone.
        barrier(d)
    finally:
        shutdown(d)


def shutdown(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def broadcast_module(d: Dist, module: torch.nn.Module) -> None:
    """Rank 0's weights and buffers everywhere (after initialisation or a resume)."""
    if not d.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def average_gradients(d: Dist, params: list[torch.Tensor]) -> None:
    """Average the gradients over the processes in one collective (flattened into one buffer,
    as DDP's buckets are). The GAN step calls D three times per step with different inputs
    and D's weights frozen in G's update, a pattern DDP's one-forward-one-backward reducer is
    not made for; the classifier uses DDP itself."""
    if not d.active:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(d.world)
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def mean_and_flag(d: Dist, values: torch.Tensor, flag: bool) -> tuple[torch.Tensor, bool]:
    """Average `values` over the processes and OR `flag` (e.g. "stop requested") in one collective."""
    if not d.active:
        return values, flag
    import torch.distributed as dist

    flat = torch.cat([values.float().reshape(-1), torch.tensor([float(flag)], device=values.device)])
    dist.all_reduce(flat)
    return (flat[:-1] / d.world).view(values.shape), bool(flat[-1].item() > 0)


def broadcast_floats(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Rank 0's numbers on every process (decisions only rank 0 can make, e.g. validation)."""
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.tolist()
