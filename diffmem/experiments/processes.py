"""An experiment run by several processes under torchrun: detection, the process group, each
rank's share of a set of rows, and the few collectives a run needs.

torchrun is detected by its environment variables (RANK, WORLD_SIZE, LOCAL_RANK; a world of
one is a plain run). The group uses gloo for CPU devices and NCCL for CUDA ones, where rank r
takes cuda:LOCAL_RANK unless --device names a GPU. Only rank 0 writes files.

A setting or data problem found on one rank must not leave the others waiting in a collective:
``agree(error)`` exchanges one flag per rank after each step that can fail, and every rank stops
(the failing one with its own message, the others naming it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Processes:
    """This process's place in the run: rank, world size and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's consecutive share of n rows (sizes differ by <= 1)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def sync(self) -> None:
        """Wait for the device's queued work (for timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        return t.detach().to(device).contiguous()

    def agree(self, error: Exception | None = None) -> None:
        """Raise error on its rank and a ConfigError naming the failed ranks on the others, if
        any rank failed; nothing otherwise. Every rank must call it at the same point."""
        if self.distributed:
            flags = self._comm(torch.zeros(self.world, dtype=torch.int64))
            flags[self.rank] = error is not None
            dist.all_reduce(flags)
            failed = [r for r in range(self.world) if flags[r]]
        else:
            failed = [0] if error is not None else []
        if error is not None:
            raise error
        if failed:
            raise ConfigError(f"stopped because rank(s) {failed} failed (see the error there)")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of t over the ranks (a copy, on t's device)."""
        if not self.distributed:
            return t
        buf = self._comm(t.clone())
        dist.all_reduce(buf)
        return buf.to(t.device)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of t (n_r, ...) concatenated in rank order, on every rank."""
        if not self.distributed:
            return t
        sizes = self.sum(torch.zeros(self.world, dtype=torch.int64).index_fill_(
            0, torch.tensor([self.rank]), t.shape[0]))
        most = int(sizes.max())
        pad = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        pad[:t.shape[0]] = t
        buf = self._comm(pad)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf)
        return torch.cat([o[:int(n)] for o, n in zip(out, sizes)]).to(t.device)

    def broadcast_flags(self, flags: list[bool]) -> list[bool]:
        """Rank 0's flags, on every rank."""
        if not self.distributed:
            return flags
        buf = self._comm(torch.tensor([int(f) for f in flags], dtype=torch.int64))
        dist.broadcast(buf, 0)
        return [bool(v) for v in buf.cpu().tolist()]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None outside it (or for
    a world of one). ConfigError for values that make no sense."""
    if not all(k in os.environ for k in ENV):
        return None
    try:
        rank, world, local = (int(os.environ[k]) for k in ENV)
    except ValueError:
        raise ConfigError(f"torchrun environment: RANK, WORLD_SIZE and LOCAL_RANK must be "
                          f"integers, got {[os.environ[k] for k in ENV]}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"torchrun environment: need 0 <= RANK < WORLD_SIZE, got RANK={rank}, "
                          f"WORLD_SIZE={world}")
    return None if world == 1 else (rank, world, local)


def start_processes(device: str) -> Processes:
    """This process's Processes; under torchrun, after joining the process group."""
    found = torchrun_world()
    dev = torch.device(device)
    if found is None:
        return Processes(0, 1, dev)
    rank, world, local = found
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot join the torchrun process group: "
                          f"{str(e).splitlines()[0]}") from None
    return Processes(rank, world, dev)


__all__ = ["ENV", "Processes", "start_processes", "torchrun_world"]
