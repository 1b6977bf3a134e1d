"""Run independent tasks (the data stage's work units) in this process, a process pool, or on Dask.

All three keep at most ``IN_FLIGHT_PER_WORKER`` tasks per worker submitted at a time, so the
memory of a run depends on the unit size and the worker count, never on how many units the
corpus has. Results are handed to ``on_result`` as tasks finish, in whatever order they finish:
callers must not depend on it (the data stage writes each unit's output under the unit's own
name and assembles them in unit order).

Dask is dask.distributed's ``Client`` on an existing cluster (``data.dask_scheduler`` or
``DASK_SCHEDULER_ADDRESS``); the tasks must reach their input and output through shared storage
(the corpus source and an ``s3://`` store), since a remote worker has nothing else.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from stages.core.errors import ConfigError

IN_FLIGHT_PER_WORKER = 2
SCHEDULER_VARIABLE = "DASK_SCHEDULER_ADDRESS"


def all_cores() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else all_cores()


def start_method() -> str:
    """'fork' when this process runs one thread, else 'spawn'.

    Forking a process whose other threads hold locks (Prefect's task runner, MLflow's
    loggers) can deadlock the child, so a threaded host gets 'spawn'. But 'spawn' re-imports
    the caller's ``__main__``, which breaks a plain script without an ``if __name__ ==
    "__main__":`` guard; a single-threaded caller is safe to fork, so it gets 'fork'.
    """
    # tqdm's monitor thread and our own RSS sampler never touch what a child uses.
    ignored = {"tqdm_monitor", "gptpipe-rss"}
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name not in ignored]
    if not others and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def scheduler_address(configured: str | None) -> str:
    address = configured or os.environ.get(SCHEDULER_VARIABLE, "")
    if not address:
        raise ConfigError(
            f"data.executor=dask needs a scheduler: set data.dask_scheduler (e.g. tcp://HOST:8786) or {SCHEDULER_VARIABLE}"
        )
    return address


def run_tasks(
    fn: Callable[..., Any],
    tasks: Iterable[tuple],
    on_result: Callable[[Any], None],
    *,
    executor: str = "processes",
    workers: int = 1,
    scheduler: str | None = None,
) -> None:
    """``fn(*task)`` for every task; ``on_result`` sees each result in this process as it arrives."""
    tasks = iter(tasks)
    if executor == "dask":
        _run_dask(fn, tasks, on_result, scheduler_address(scheduler))
    elif workers <= 1:
        for task in tasks:
            on_result(fn(*task))
    else:
        _run_pool(fn, tasks, on_result, workers)


def _run_pool(fn: Callable[..., Any], tasks: Iterator[tuple], on_result: Callable[[Any], None], workers: int) -> None:
    context = multiprocessing.get_context(start_method())
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: set = set()
        try:
            for task in tasks:
                pending.add(pool.submit(fn, *task))
                while len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_result(future.result())
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    on_result(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _run_dask(fn: Callable[..., Any], tasks: Iterator[tuple], on_result: Callable[[Any], None], address: str) -> None:
    from distributed import Client, as_completed

    with Client(address, timeout="30s") as client:
        workers = max(1, sum(info.get("nthreads", 1) for info in client.scheduler_info()["workers"].values()))
        limit = workers * IN_FLIGHT_PER_WORKER
        # pure=False: a unit is work with side effects (it writes files), never deduplicated by Dask.
        running = as_completed()
        count = 0
        for task in tasks:
            running.add(client.submit(fn, *task, pure=False))
            count += 1
            if count >= limit:
                future = next(running)
                on_result(future.result())
                count -= 1
        for future in running:
            on_result(future.result())
