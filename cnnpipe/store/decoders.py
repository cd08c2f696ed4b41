"""The crash-isolated decoder process pool: an image that kills or hangs its decoder costs only itself.

Images decode in worker processes, chunk by chunk and in order. When a chunk's worker dies or
runs late, its images are decoded again one by one to find the culprit, which is refused; the
rest are kept.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import active_children, forkserver, get_all_start_methods, get_context

from cnn.cores import usable_cores
from cnnpipe.base.processes import start_worker
from cnnpipe.sources import Entry
from cnnpipe.sources.images import CheckedBatch, check_batch

# Images a decoding call: each costs a future, two pickles and a batch of verdicts, and chunks of 256
# made the CIFAR-10 folder's ingest about 5% slower (1.37-1.59 s against 1.28-1.39 s, paired, 2 cores).
VALIDATION_CHUNK = 1024
# Or fewer, where images are large: a chunk of 256 photos kept a decoder busy for a sixth of a
# second, and the last one alone at the end of the run while the other waited.
VALIDATION_CHUNK_BYTES = 4 * 1024 * 1024
# A decoder that hangs must not hang the ingest: a chunk of images gets CHUNK_TIMEOUT
# seconds, then its images are retried one by one with ITEM_TIMEOUT seconds each.
CHUNK_TIMEOUT = 300.0
ITEM_TIMEOUT = 30.0

@dataclass
class _Pending:
    entry: Entry
    sha256: str
    label: str
    split: str


# What a decoding process imports, once, in the server that forks them.
_DECODER_MODULES = ["cnnpipe.base.processes", "cnnpipe.sources.images"]


def decoder_context(modules: list[str] = _DECODER_MODULES):
    """Decoders fork from a server process that imported their `modules` once, as Python 3.14 does by
    default on Linux: a spawned decoder started an interpreter and imported NumPy, Pillow and the check,
    0.18 CPU-s each, a sixth of the CPU that ingesting 2,000 photos took on 2 cores. Where there is no fork
    server, they are spawned. `bench/ingest.py` starts its decoding baselines with it too."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(modules)
    try:
        with _owners_import_path():
            forkserver.ensure_running()
    except OSError:  # its socket's path is too long for AF_UNIX under a deep TMPDIR, say
        return get_context("spawn")
    return context


@contextmanager
def _owners_import_path() -> Iterator[None]:
    """A fork server started meanwhile imports its modules from this process's `sys.path`. Python 3.11's
    ignores the path it is given and, started with `-c`, looks in the current folder first: run from
    inside a checkout of another cnnpipe version, the decoders imported that version's check, and every
    image was refused as `decoder_crashed`. The server takes the path from the environment it starts in."""
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSAFEPATH")}
    os.environ["PYTHONPATH"] = os.pathsep.join(path or os.getcwd() for path in sys.path)
    os.environ["PYTHONSAFEPATH"] = "1"  # no current folder before it
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _DecoderPool:
    """Decoding processes that can be killed mid-call. The executor has no public way to end a
    running call, so every worker reports its pid as it starts. A worker takes this process's
    environment as it is now, which the fork server, started once, may not have (FAILPOINT, say)."""

    def __init__(self, workers: int):
        context = decoder_context()
        self._pids = context.SimpleQueue()
        self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker,
                                            initargs=(self._pids, dict(os.environ)))

    def submit(self, datas: list[bytes], resize: int | None) -> Future:
        try:
            return self.executor.submit(check_batch, datas, resize)
        except BrokenProcessPool as exc:
            # A worker died on an earlier call and the pool knew before this one went in: this call
            # fails as those in flight did, and is decoded again once the culprit is found.
            failed: Future = Future()
            failed.set_exception(exc)
            return failed

    def shutdown(self) -> None:
        self.executor.shutdown(cancel_futures=True)

    def kill(self) -> None:
        # A running call cannot be cancelled, and a hung one would block shutdown: end the workers.
        # Only live children with a pid this pool's workers reported are killed: a pid of a worker
        # that already exited and was reaped may belong to another process by now.
        started = set()
        while not self._pids.empty():
            started.add(self._pids.get())
        for process in active_children():
            if process.pid in started:
                process.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)


class _Validator:
    """Decodes chunks of images in worker processes, in order, with bounded memory."""

    def __init__(self, resize: int | None, workers: int | None):
        self.resize = resize
        # A decoder a core: decoding and hashing cost more than the reading, hashing and writing that
        # this process does meanwhile, which mostly waits for them (the CIFAR-10 folder on 2 cores:
        # 2.9 s with two decoders, 3.3 s with one).
        self.workers = usable_cores() if workers is None else workers
        self.pool: _DecoderPool | None = None
        self.inflight: deque[tuple[list[_Pending], Future]] = deque()

    def __enter__(self) -> _Validator:
        if self.workers:
            # Start the workers now: their start-up then overlaps listing the source.
            self.pool = _DecoderPool(self.workers)
            self.pool.submit([], None)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def submit(self, chunk: list[_Pending]) -> Iterator[tuple[list[_Pending], CheckedBatch]]:
        datas = [item.entry.data for item in chunk]
        if self.workers == 0 or (self.pool is None and len(chunk) < VALIDATION_CHUNK):
            # Small sources are not worth starting processes for.
            yield chunk, check_batch(datas, self.resize)
            return
        if self.pool is None:
            self.pool = _DecoderPool(self.workers)
        self.inflight.append((chunk, self.pool.submit(datas, self.resize)))
        while len(self.inflight) > 2 * self.workers:
            yield from self._collect()

    def drain(self) -> Iterator[tuple[list[_Pending], CheckedBatch]]:
        while self.inflight:
            yield from self._collect()

    def _collect(self) -> Iterator[tuple[list[_Pending], CheckedBatch]]:
        chunk, future = self.inflight.popleft()
        try:
            results = future.result(timeout=CHUNK_TIMEOUT)
        except (BrokenProcessPool, TimeoutError):
            results = self._isolate(chunk)
        yield chunk, results

    def _isolate(self, chunk: list[_Pending]) -> CheckedBatch:
        """A decoder killed or hung a worker: find the culprit, keep the rest."""
        self.pool.kill()
        results = CheckedBatch()
        remaining = chunk
        while remaining:
            # One worker runs them in order, so the first broken or late future is the culprit.
            single = _DecoderPool(1)
            futures = [single.submit([item.entry.data], self.resize) for item in remaining]
            for index, future in enumerate(futures):
                try:
                    results.extend(future.result(timeout=ITEM_TIMEOUT))
                except (BrokenProcessPool, TimeoutError) as exc:
                    results.refuse(*(("decoder_crashed", "the decoding process died on this file")
                                     if isinstance(exc, BrokenProcessPool)
                                     else ("decode_timeout", f"decoding took over {ITEM_TIMEOUT:.0f} s")))
                    remaining = remaining[index + 1:]
                    break
            else:
                remaining = []
            single.kill()
        self.pool = _DecoderPool(self.workers)
        pending, self.inflight = self.inflight, deque()
        for later_chunk, _ in pending:
            self.inflight.append((later_chunk, self.pool.submit(
                [item.entry.data for item in later_chunk], self.resize)))
        return results
