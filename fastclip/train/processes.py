"""The processes of a run: torchrun's environment (NCCL on GPUs, gloo on CPUs) or one process,
and the collectives the steps need. With one process every function here is a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

DEVICES = ("auto", "cuda", "cpu")


def check_available(device: str) -> None:
    """A ValueError if ``device`` (one of DEVICES) names hardware this machine lacks."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' asks for a GPU, but torch finds no CUDA device here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): use "
            "--device cpu, or auto, which takes a GPU when there is one"
        )


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) for ``device`` (one of DEVICES): torchrun's environment when
    present, else one process."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cuda
        else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, target


def broadcast_weights(model: torch.nn.Module, world: int) -> None:
    """Every process starts from rank 0's weights."""
    if world > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """All-reduce the gradients once (one flat buffer) and divide by the number of processes."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(new.view_as(g))


def average(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of ``value`` over the processes, in place."""
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def common_rows(images: list, captions: list[str], world: int) -> tuple[list, list[str]]:
    """Undecodable samples leave a batch short; every process keeps as many rows as the
    shortest, so that features gather in equal shapes."""
    if world > 1:
        n = torch.tensor(len(images))
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        images, captions = images[: int(n)], captions[: int(n)]
    return images, captions


def barrier(world: int) -> None:
    """Wait for every process."""
    if world > 1:
        dist.barrier()


def shutdown(world: int) -> None:
    """Leave the process group at the end of the run."""
    if world > 1:
        dist.destroy_process_group()
