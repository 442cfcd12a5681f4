"""CPU threads for sites that share one machine (simulator threads, POC sites): no oversubscription.

Every FLARE site runs its job in its own process, and torch's intra-op pool uses every core of the machine by
default (``torch.get_num_threads() == os.cpu_count()``). With ``n`` sites training side by side on one machine that
is ``n x cores`` busy-waiting OpenMP threads on ``cores`` cores; measured on a 2-core machine with the shipped
``dino_pretrain`` job (2 simulated sites, ``-t 2``): 120 s with torch's default, 59 s with one thread per site
(tests/integration/test_simulator_dino.py). ``OMP_NUM_THREADS`` is read by torch when it starts, and FLARE passes
its environment on to the site processes it spawns, so setting it for the processes that launch the sites is
enough. A value the user already set is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["THREAD_VARS", "threads_per_site", "site_thread_env"]

#: the thread-count variables of the OpenMP / MKL / OpenBLAS pools that torch and numpy may use
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def threads_per_site(parallel_sites: int, cpu_count: int | None = None) -> int:
    """Threads for each of ``parallel_sites`` processes sharing ``cpu_count`` cores (default: this machine's):
    ``max(1, cpu_count // parallel_sites)``."""
    if parallel_sites < 1:
        raise ValueError(f"parallel_sites must be >= 1, got {parallel_sites}")
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, cores // parallel_sites)


def site_thread_env(
    parallel_sites: int, env: Mapping[str, str] | None = None, cpu_count: int | None = None
) -> dict[str, str]:
    """``env`` (default ``os.environ``) with each of :data:`THREAD_VARS` that is unset there set to
    :func:`threads_per_site`; variables the user set are kept as they are."""
    out = dict(os.environ if env is None else env)
    n = str(threads_per_site(parallel_sites, cpu_count))
    for var in THREAD_VARS:
        if not out.get(var):
            out[var] = n
    return out
