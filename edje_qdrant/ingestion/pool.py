"""A small thread pool with priorities and a per-task time limit that never blocks the caller forever.

Why not ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one file that hangs a
decoder would hang the program too. Here workers are daemon threads; a task that runs past its limit
is abandoned (its thread exits when it finally returns) and a fresh worker takes its place, so the run
goes on at full width. Pillow releases the GIL while decoding, so threads give real parallelism.
Measured on 2 (shared) cores, 1600x1200 JPEGs + the tiny model: 2 threads 14.1 img/s, a 2-process
pool 12.9 img/s, 1 thread 13.3 img/s: processes buy nothing here and would need the model's
preprocessing pickled into each, so threads it is.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from .decode import UnusableFile

HASH_PRIORITY = 0  # the producer waits on these; they go before queued decodes
DECODE_PRIORITY = 1
_POLL_S = 0.25
_JOIN_S = 5.0  # shutdown waits this long in all for the workers to exit (a hung decoder is left behind)


class Task:
    __slots__ = ("fn", "args", "future", "started", "abandoned", "runner")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.future: Future[Any] = Future()
        self.started: float | None = None
        self.abandoned = False
        self.runner: threading.Thread | None = None


class TaskPool:
    """``submit`` tasks, then ``wait`` on each with a time limit counted from when it started running."""

    def __init__(self, workers: int, name: str = "edje-ingest") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Task | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._name = name
        self._workers = workers
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._stuck: set[threading.Thread] = set()  # running an abandoned task: never waited for
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._run, name=f"{self._name}-{next(self._seq)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = DECODE_PRIORITY) -> Task:
        task = Task(fn, args)
        if self._closed:
            task.future.cancel()
        else:
            self._queue.put((priority, next(self._seq), task))
        return task

    def _run(self) -> None:
        while True:
            _, _, task = self._queue.get()
            if task is None:
                return
            if not task.future.set_running_or_notify_cancel():
                continue
            task.runner = threading.current_thread()
            task.started = time.monotonic()
            try:
                result = task.fn(*task.args)
            except BaseException as exc:  # delivered to the waiter
                task.future.set_exception(exc)
            else:
                task.future.set_result(result)
            result = None
            with self._lock:
                abandoned = task.abandoned
            # Hold nothing while idle: a task's args (the model) must never be freed in this thread. If its last
            # reference went here after the interpreter began shutting down, freeing the torch tensors would
            # abort the process ("terminate called without an active exception", rc 134).
            task = None
            if abandoned:  # a replacement worker already runs in our place
                return

    def wait(self, task: Task, limit: float) -> Any:
        """The task's result; its exception; UnusableFile(kind="timeout") past ``limit`` s of running;
        CancelledError after ``shutdown``."""
        while True:
            started = task.started
            timeout = _POLL_S if started is None else max(0.0, started + limit - time.monotonic())
            try:
                return task.future.result(timeout=timeout)
            except FutureTimeout:
                if task.started is None or time.monotonic() - task.started < limit:
                    continue
                with self._lock:
                    if task.future.done():
                        continue
                    task.abandoned = True
                    if task.runner is not None:
                        self._stuck.add(task.runner)
                    if not self._closed:
                        self._spawn()
                raise UnusableFile(
                    f"took longer than the per-file limit of {limit:g} s (abandoned; raise file_timeout if the "
                    "file is just large)",
                    "timeout",
                    "Timeout",
                ) from None

    def shutdown(self, join_s: float = _JOIN_S) -> None:
        """Cancel queued tasks, tell the workers to exit and wait (up to ``join_s`` in all) until they have.

        Waiting matters: a daemon worker still running when the interpreter shuts down is killed inside whatever
        native code it is in, which can abort the process (SIGABRT, "terminate called without an active
        exception") after all the work was done. Only a worker stuck past its per-file limit is left behind."""
        with self._lock:
            self._closed = True
            threads = [t for t in self._threads if t not in self._stuck]
        while True:
            try:
                _, _, task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.future.cancel()
        for _ in range(len(threads)):  # one exit marker per live worker (a stuck one exits once its task returns)
            self._queue.put((-1, next(self._seq), None))
        deadline = time.monotonic() + join_s
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def alive_workers(self) -> int:
        """Worker threads still running (0 after a clean ``shutdown``)."""
        return sum(t.is_alive() for t in self._threads)


__all__ = ["TaskPool", "Task", "HASH_PRIORITY", "DECODE_PRIORITY", "CancelledError"]
