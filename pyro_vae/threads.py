"""How many CPU threads torch uses for one command or one library call (``train.threads``, ``--threads``).

torch starts with one intra-op thread per physical core. The networks of a VAE
are small (a minibatch of 128 through layers of a few hundred units), so each
operation is over in microseconds and extra threads mostly wait for each other;
on a machine with few cores that also compete with other work, they make a run
several times slower. ``auto`` therefore asks for

    threads = max(1, min(4, CPUs available to this process // 4))

that is one thread below 8 CPUs, two from 8, three from 12, four from 16 on.
An integer asks for that many threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

AUTO = "auto"
MOST_AUTO = 4  # small networks gain nothing from more intra-op threads
CPUS_PER_THREAD = 4


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve(setting: int | str) -> int:
    """The thread count of ``setting``: an integer >= 1 as it is, ``auto`` by the rule of the module docstring."""
    if setting == AUTO:
        return max(1, min(MOST_AUTO, available_cpus() // CPUS_PER_THREAD))
    return int(setting)


@contextmanager
def using(setting: int | str) -> Iterator[int]:
    """Run the body with ``resolve(setting)`` torch threads, then restore the previous count; yields the count."""
    previous = torch.get_num_threads()
    count = resolve(setting)
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
