"""Order-preserving map over batches of documents, in worker processes when there are several."""

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterator


def process_running(pid: int) -> bool:
    """Whether a process of this host with this id runs (a stale lock or staging directory
    names one that does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def process_count(requested: int) -> int:
    """`requested`, or every core when it is 0."""
    return requested or os.cpu_count() or 1


def batches_by_size(texts: list[str], batch_chars: int) -> Iterator[list[str]]:
    """Consecutive batches of about `batch_chars` characters (a longer text is a batch alone)."""
    batch, size = [], 0
    for text in texts:
        if batch and size + len(text) > batch_chars:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


class BatchMapper:
    """Maps functions over batches of texts with a pool of `processes` workers (none if 1).

    Workers are spawned, not forked: the caller may already run JAX threads, which do not
    survive a fork. Spawning costs a few seconds (each worker imports the caller's main
    module), so one mapper serves every step of a preparation.
    """

    def __init__(self, processes: int):
        context = multiprocessing.get_context("spawn")
        self._pool = None
        if processes > 1:
            self._pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=context)

    def __enter__(self) -> "BatchMapper":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool:
            self._pool.shutdown(cancel_futures=True)

    def map(self, function: Callable[[list], list], texts: list[str], batch_chars=1_000_000) -> list:
        """function(batch) over size-balanced batches, results concatenated in input order.

        `function` must be picklable: module level, or a functools.partial of one.
        """
        batches = batches_by_size(texts, batch_chars)
        if self._pool is None:
            return [result for batch in batches for result in function(batch)]
        return [result for results in self._pool.map(function, batches) for result in results]
