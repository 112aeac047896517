"""CPU threads of a trial: as many as the cores it was given, and idle ones sleep.

Torch's OpenMP threads spin-wait by default and take the cores of whatever shares them (docs/models.md,
"CPU threads", has the measurement). The wait policy is read once, when the OpenMP runtime loads with
torch, so it is set in the environment before torch is imported: by the command line at start and, for
Ray workers, in the runtime environment of the sweep.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"
_OURS = "IDEMPO_SET_OMP_WAIT_POLICY"  # the policy in the environment is idempo's, not the user's


def passive_wait_policy() -> dict[str, str]:
    """Make idle OpenMP threads sleep, unless the user chose a policy (no effect on a torch already imported).
    Returns the variables Ray workers need for the same: none where the policy is the user's, which
    reaches workers however the user set it (a job's runtime environment, the shell of `ray start`)."""
    if WAIT_POLICY in os.environ and os.environ.get(_OURS) != "1":
        return {}
    os.environ[WAIT_POLICY], os.environ[_OURS] = "PASSIVE", "1"
    return {WAIT_POLICY: "PASSIVE"}


def given_cores() -> int:
    """The CPUs this process was given: its Ray resources inside a Ray worker, else its CPU affinity."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_threads(threads: int | None) -> int:
    """Torch's intra-op threads: `threads`, or the cores given to this process; returns the number set."""
    import torch

    count = threads or given_cores()
    torch.set_num_threads(count)
    return count
