"""How many CPU threads torch gets: `--threads`, or as many cores as are free when a command starts.

torch starts one intra-op thread per core. On a machine other jobs share, that is the wrong number:
an op splits its work over all the threads and then waits for the slowest, and a thread whose
core is taken waits for the scheduler, so every op runs at the speed of its most descheduled
part. On 2 cores, a DPO run went from about 9 s to 1 s a step the moment one competing job ended
(issue 23); `benchmarks/busy_machine.py` times `rlhf demo` quiet and beside CPU burners at 1, 2
and automatic threads. So by default a command counts the cores that are idle at its start, over a short window, and uses
that many threads (at least one, at most torch's own default).

Nothing here imports torch: the CLI decides before it loads any model.
"""

from __future__ import annotations

import os
import time

# What the CLI chose, in a few words, for the run's config.json (None: not chosen here, as when
# `train_ppo` is called from Python, which leaves torch's threads as they are).
CHOSEN: str | None = None

# How long the start-up sample of the CPU counters lasts: long enough to see a busy core (the
# kernel updates the counters every tick, 1-10 ms), short enough not to be noticed.
SAMPLE_S = 0.25


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; `os.cpu_count()` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies over all cores since boot, from /proc/stat; None where it is absent."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return values[3] + values[4], sum(values)


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """How many cores' worth of work other processes ran during a short sample (None: unknown).

    Reads the machine-wide counters twice, `sample_s` apart. This process sleeps meanwhile, so all
    the work seen is someone else's. Where /proc/stat is absent (macOS, Windows), the one-minute
    load average stands in.
    """
    first = _cpu_times()
    if first is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return None
    time.sleep(sample_s)
    second = _cpu_times()
    idle, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    cores = os.cpu_count() or 1
    return cores * (1 - idle / total)


def free_cores_threads(cores: int, busy: float | None) -> int:
    """The thread count for `cores` usable cores when `busy` cores' worth of other work runs:
    the idle cores, rounded down, but at least one. A core counts as taken once other processes
    keep it more than a quarter busy: a thread sharing it waits that often."""
    if busy is None:
        return cores
    free = cores - int(busy + 0.75)  # 0.25 busy or less: still free
    return max(1, min(cores, free))


def choose_threads(requested: int | None, default: int) -> tuple[int, str]:
    """The intra-op thread count, and a few words on why (for the run's config and log).

    `requested`: the `--threads` option (None or 0: automatic). `default`: torch's own choice
    (`torch.get_num_threads()` before any change), the most automatic mode picks.
    """
    if requested:
        return requested, "--threads"
    cores = min(usable_cores(), default)
    busy = busy_cores()
    threads = free_cores_threads(cores, busy)
    if busy is None:
        return threads, f"{threads} of {cores} cores (load unknown)"
    return threads, f"{threads} of {cores} cores free at start ({busy:.1f} busy)"
