"""Worker pools for all of cosmofm: how many workers, and one ordered parallel map.

    workers = n_workers(args.workers)       # None: one per core torch would use, at most 8
    for table in in_parallel(find, iter(plan), workers, processes=True, progress=True, desc="deblend", unit="tile"):
        ...

`in_parallel(fn, items, workers)` yields fn(item) for each item, in the items' order,
`workers` at a time, with at most two pieces of work per worker in flight (a lazy `items`
stays lazy and finished results wait in memory only that long). It serves the predict
path (`finetune.predict`), the tiled deblend / detect verbs (`finetune.tiling`), the mock
generators (`mocks.generators`, `mocks.bank`, `heads.deblending.labelled_mocks`) and the
classical template-fit classifier (`heads.classical_classifier`).

Where the work runs:
- `workers` < 2: in this process, one item after the other.
- `processes=False`: threads of this process (a model on a GPU, or a caller that must see
  the workers' memory). Threads share the GIL, which the Python parts of reading and of
  building catalogue rows hold, and one address space, whose page faults and unmaps they
  serialise: 2 threads classified 40,000 spectra ~1.3x slower than 2 processes on 2 cores.
- `processes=True`: forked worker processes where forking is safe (`can_fork`: Linux), so
  the children inherit `fn` (a closure over a loaded model, say) instead of unpickling it;
  elsewhere threads, as `fn` may not pickle.
- `processes=True, picklable=True`: the caller vouches that fn, the items and the results
  pickle, so the work never falls back to threads: fork where the OS offers it (Linux,
  macOS), else spawn (fn is then pickled once per worker, not once per item).

Each worker is single-threaded in torch (when torch is loaded: `torch.set_num_threads(1)`,
process-wide for threads and restored after), because whole pieces side by side beat one
piece over all cores: small models scale badly over intra-op threads (2 threads ~1.2x one
on 2 cores), and a worker reading its next piece overlaps the others' compute.

An exception raised by fn reaches the caller as itself (an `InputError` keeps its field,
problem and fix across the process boundary), with a note naming the item that failed
(`add_note`: shown under the traceback) and, from a worker process, the worker's traceback
as its cause. The pool is closed (its processes ended) when the caller stops reading.

Torch-free on purpose, at the bottom layer: the classical paths (sep / photutils deblending,
the SoFiA-style finder, mock generation) run their workers without importing torch, which
takes 4-13 s. `cores()` reads torch's thread count where torch is already loaded (so a run
that called `torch.set_num_threads(k)` gets k workers) and otherwise applies torch's rule.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections import deque
from typing import Callable, Iterable, Iterator

from cosmofm.data_cards.errors import InputError

MAX_WORKERS = 8  # each worker holds a piece (a tile, a chunk of spectra) in memory
ITEM_REPR_CHARS = 200  # how much of the failing item's repr the error note shows


def cores() -> int:
    """The intra-op threads torch uses (or would use): `torch.get_num_threads()` where torch is
    loaded; otherwise torch's rule: MKL_NUM_THREADS, else OMP_NUM_THREADS (the leading integer,
    when > 0; at most `os.cpu_count()`), else the physical cores this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):  # MKL's wins, as in torch
        match = re.match(r"\s*\+?(\d+)", os.environ.get(name, ""))
        if match and int(match.group(1)) > 0:
            return min(int(match.group(1)), os.cpu_count() or 1)
    return physical_cores()


def n_workers(requested: int | None = None) -> int:
    """Workers for a run: `requested` (None or 0: as many as allowed), at most one per core
    (`cores()`) and at most MAX_WORKERS. Never below 1 unless `requested` is (callers that
    take a user's number check it)."""
    cap = max(1, min(MAX_WORKERS, cores()))
    return min(requested or cap, cap)


def in_parallel(fn: Callable, items: Iterable, workers: int, *, processes: bool = False, picklable: bool = False,
                chunksize: int = 1, initializer: Callable[[], None] | None = None, progress: bool = False,
                desc: str | None = None, unit: str = "it", total: int | None = None) -> Iterator:
    """fn(item) for each item, in order, `workers` at a time (see the module docstring for
    where they run).

    chunksize: items per piece of work sent to a worker (for cheap items, where sending one
        at a time would cost more than the work).
    initializer: run once in each worker process before its first item (not in threads, nor
        in this process when workers < 2); with spawn it must pickle.
    progress, desc, unit, total: a tqdm bar counting results (total: len(items) if it has one).
    """
    if chunksize < 1:
        raise InputError("chunksize", f"must be >= 1, got {chunksize}", "give the number of items per piece of work, e.g. 1")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total if total is not None else (len(items) if hasattr(items, "__len__") else None), desc=desc, unit=unit)
    name = getattr(getattr(fn, "func", fn), "__name__", None) or type(fn).__name__  # a partial: its function's name
    try:
        for result in _results(fn, iter(items), workers, processes, picklable, chunksize, initializer, name):
            if bar is not None:
                bar.update(1)
            yield result
    finally:
        if bar is not None:
            bar.close()


def can_fork() -> bool:
    """Whether worker processes can be forked safely: Linux (macOS forks, but its system
    frameworks are not fork-safe; Windows cannot)."""
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def keep_freed_memory() -> None:
    """glibc: serve a worker's large arrays from its heap and keep what it frees there, rather
    than mapping fresh pages for each and unmapping them after: a predict worker allocates the
    same few tens of MB per batch again and again, and faulting them in anew cost ~2 s of
    system time per 40,000 spectra (10x fewer page faults with this). For worker processes
    (an `in_parallel` initializer): the worker exits at the end of the run, which returns the
    memory. No-op without glibc's mallopt."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 256 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)):
        mallopt(option, value)


# ---------------------------------------------------------------------------- inside


def _results(fn, items: Iterator, workers: int, processes: bool, picklable: bool, chunksize: int, initializer, name: str) -> Iterator:
    if workers < 2:
        for k, item in enumerate(items):
            try:
                result = fn(item)
            except Exception as e:
                _name_item(e, name, k, item)
                raise
            yield result
        return
    chunks = iter(lambda: list(itertools.islice(items, chunksize)), [])
    if processes and (can_fork() or picklable):
        import multiprocessing

        # fork: the children inherit fn (a closure over a loaded model) instead of unpickling it
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers, initializer=_start_worker, initargs=(fn, initializer)) as pool:
            yield from _bounded(chunks, lambda chunk: pool.apply_async(_run_in_worker, (chunk,)), lambda job: job.get(), 2 * workers, name)
        return
    from concurrent.futures import ThreadPoolExecutor

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)  # process-wide: restored below
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cosmofm-worker") as pool:
            yield from _bounded(chunks, lambda chunk: pool.submit(_run_chunk, fn, chunk, False), lambda job: job.result(), 2 * workers, name)
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def _bounded(chunks: Iterator[list], submit, result, limit: int, name: str) -> Iterator:
    """The results of result(submit(chunk)) for each chunk, in order, with at most `limit`
    chunks submitted and not yet yielded; a chunk's failure raised with its item named."""
    pending: deque = deque()
    done = 0  # items yielded so far: the index of the next one

    def finish(chunk, job):
        nonlocal done
        values, failure = result(job)
        yield from values
        done += len(values)
        if failure is not None:
            k, error, remote = failure
            if remote is not None:
                error.__cause__ = _RemoteTraceback(remote)
            _name_item(error, name, done, chunk[k])
            raise error

    for chunk in chunks:
        pending.append((chunk, submit(chunk)))
        if len(pending) >= limit:
            yield from finish(*pending.popleft())
    while pending:
        yield from finish(*pending.popleft())


def _run_chunk(fn, chunk: list, remote: bool) -> tuple:
    """(results, None), or (results before the failure, (index in chunk, exception, its
    traceback text from a worker process or None)): the failing item stays known."""
    out = []
    for k, item in enumerate(chunk):
        try:
            out.append(fn(item))
        except Exception as e:
            text = None
            if remote:  # a traceback does not cross the process boundary: its text does
                import traceback

                text = "".join(traceback.format_exception(e))
            return out, (k, e, text)
    return out, None


def _name_item(error: BaseException, name: str, index: int, item) -> None:
    text = repr(item)
    if len(text) > ITEM_REPR_CHARS:
        text = text[: ITEM_REPR_CHARS - 3] + "..."
    error.add_note(f"in_parallel: {name} failed on item {index}: {text}")


class _RemoteTraceback(Exception):
    """The failing worker's traceback, as the cause of the exception re-raised here."""

    def __str__(self):
        return "\n" + self.args[0]


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthread siblings count once)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    siblings = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings.add(f.read().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(siblings))


_WORKER_FN = None  # in a worker process: the function it runs (`in_parallel`)


def _start_worker(fn, initializer) -> None:
    global _WORKER_FN
    _WORKER_FN = fn
    torch = sys.modules.get("torch")  # loaded: inherited from the parent, or by unpickling fn
    if torch is not None:
        torch.set_num_threads(1)  # one core per worker
    if initializer is not None:
        initializer()


def _run_in_worker(chunk: list) -> tuple:
    return _run_chunk(_WORKER_FN, chunk, True)


__all__ = ["MAX_WORKERS", "can_fork", "cores", "in_parallel", "keep_freed_memory", "n_workers", "physical_cores"]
