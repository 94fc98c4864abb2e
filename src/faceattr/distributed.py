"""Several training processes under torchrun: which folds are whose, and waiting for each other.

`torchrun --nproc_per_node=G -m faceattr train ...` starts G processes; rank r trains the folds k
with k mod G = r on its own device, all write into the same run folder (each fold's files are its
own), and rank 0 gathers the out-of-fold scores and writes the run's summary. Multi-node works
through torchrun's usual rendezvous flags; the run folder must then be on a shared filesystem.

Waiting for each other goes through a CPU (gloo) group of its own, with no practical time limit:
a process that is done with its folds may wait a whole fold for the others, and the default
group's limit (10 minutes under NCCL) would abort it. DDP's gradients keep the default group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

WAIT = timedelta(days=7)  # how long a process waits for the others: longer than any fold


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # The group barriers go through (None: the default one).
    waits: dist.ProcessGroup | None = field(default=None, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, fold_index: int) -> bool:
        """Whether this process trains the fold with 0-based index `fold_index`."""
        return fold_index % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.waits)


SINGLE = Ranks()  # one process, as without torchrun


def from_environment(device: torch.device) -> tuple[Ranks, torch.device]:
    """The ranks torchrun set up (none outside torchrun), and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    waits = dist.new_group(backend="gloo", timeout=WAIT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, waits), device


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def peer_stopped(e: RuntimeError) -> bool:
    """Whether `e` is a collective that failed on a lost process: gloo raises a plain
    RuntimeError naming itself, NCCL a torch.distributed.DistError."""
    lost = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")
    return isinstance(e, getattr(dist, "DistError", ())) or any(text in str(e) for text in lost)
