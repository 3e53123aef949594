"""Several processes, one run (`accelerate launch` / `torchrun`): every process trains, one process writes.

Under a launcher each process is a rank of a process group (NCCL on GPUs, gloo on CPUs). The run directory is
shared, so what touches it (the work dir, caches, the final artifact) is written by the main process. Where the
others need what it wrote, they wait at a barrier and then read it; they never wait at one while the main
process does long work of its own (evaluation), which could outlast the group's timeout. If one process fails,
the launcher stops the others, so a barrier never waits for a dead rank. In one process every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def launched() -> bool:
    """True in a process started by a multi-process launcher (it sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as the launcher set it (RANK), read without starting the process group."""
    return int(os.environ.get("RANK", "0"))


def launch_local_rank() -> int:
    """This process's index on its machine (LOCAL_RANK): which of the machine's GPUs it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def sharded_by() -> str | None:
    """"FSDP" or "DeepSpeed" when `accelerate launch` was given such a config, else None."""
    for key, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(key, "false").lower() in ("1", "true"):
            return name
    return None


# how long a process may wait at a barrier: the others wait while the main process converts a GGUF base or reads
# and tokenizes a large dataset first, which can outlast NCCL's default of 10 minutes
BARRIER_TIMEOUT = datetime.timedelta(hours=3)


def state():
    """accelerate's process state (starts the process group on first use under a launcher)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def world_size() -> int:
    return state().num_processes if launched() else 1


def rank() -> int:
    return state().process_index if launched() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if launched():
        state().wait_for_everyone()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (it may write caches or reject files); the others run it after."""
    if not launched():
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(fn: Callable[[], T], then: Callable[[], T]) -> T:
    """`fn()` on the main process; the others wait for it, then call `then()` (which reads what it wrote)."""
    if not launched():
        return fn()
    if is_main():
        result = fn()
        barrier()
        return result
    barrier()
    return then()


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(state().device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.cpu()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each float averaged over the processes (all of them must call this with the same keys)."""
    if not launched() or not values:
        return values
    keys = sorted(values)
    total = _all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64), "sum")
    return dict(zip(keys, (total / world_size()).tolist(), strict=True))


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (for decisions all ranks must take together)."""
    if not launched():
        return flag
    return bool(_all_reduce(torch.tensor([1.0 if flag else 0.0]), "max").item() > 0)


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenation of every process's `t` (same shape on every rank) along dimension 0."""
    if not launched():
        return t
    import torch.distributed as dist

    local = t.detach().to(state().device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def weights_spread(named: dict[str, torch.Tensor]) -> float:
    """Largest difference, over ranks, of any trainable weight from the main process's (0.0 in one process).

    Data-parallel ranks apply the same averaged gradients, so their weights must stay equal; a spread above
    rounding says gradients were not synchronised."""
    if not launched():
        return 0.0
    import torch.distributed as dist

    flat = torch.cat([p.detach().float().flatten() for _, p in sorted(named.items())]).to(state().device)
    main = flat.clone()
    dist.broadcast(main, src=0)
    spread = (flat - main).abs().max().reshape(1)
    return float(_all_reduce(spread, "max").item())
