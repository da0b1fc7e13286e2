"""The engine's off-thread service: slow work (MUSICAL windows, networks) away from the camera path.

Every slow stage hands its jobs to one :class:`Offload` owned by the run::

    accepted = offload.submit("musical", compute_window, job,
                              on_done=lambda image: [Emission(...)],
                              on_fail=lambda reason, detail: [Emission(...)])

``submit`` never waits (unless asked to): when ``offload.max_in_flight_jobs`` jobs (or the
owner's own bound) are in flight it returns False, and the job is skipped and counted
(``skipped_busy``); the stage publishes its own skip event. Finished jobs are delivered by
:meth:`Offload.poll`, which the runner calls from its housekeeping tick, so results appear also
when no new frames arrive and while the run is paused: ``on_done(result)`` for a result,
``on_fail(reason, detail)`` otherwise, each returning the emissions to publish. ``reason`` is

- ``"failed"``: the job raised (``detail`` names the exception);
- ``"lost"``: the worker that held it died (a process killed, a Dask worker gone); the pool is
  rebuilt where needed and the run goes on;
- ``"teardown"``: still in flight when :meth:`Offload.close` gave up waiting.

A job is in flight from ``submit`` until ``poll`` (or ``close``) delivers it, so at most
``max_in_flight_jobs`` inputs and results exist at once. For every owner, at every moment::

    submitted = skipped_busy + skipped_closed + done + failed + lost + cancelled + in_flight

Callbacks run on the thread that calls ``poll`` or ``close`` (the housekeeping or lifecycle
thread), never on the stage thread: they must not touch stage state without a lock.

Backends (``offload.backend``), behind :class:`OffloadBackend`:

- ``processes`` (default): ``offload.workers`` spawned processes. Each ignores SIGINT (the daemon
  shuts the pool down in order) and exits within 0.2 s of the daemon (a thread watching its parent), so a
  ``kill -9`` of the daemon leaves no orphan; multiprocessing's resource tracker ends when the
  last process holding its pipe is gone. BLAS is limited to one thread per worker through
  ``threadpoolctl`` (batched ``eigh`` ran 15× slower with two BLAS threads than with one), and
  runs ``offload.worker_niceness`` (default 10) nicer than the daemon, so that on a busy machine
  the camera path gets the CPU first and slow jobs take what is left (or are skipped when busy).
- ``threads``: a thread pool in the daemon (no pickling; BLAS of the whole daemon limited to one
  thread, since a BLAS thread limit is process-wide).
- ``dask``: a ``distributed`` cluster: the one at ``offload.scheduler_address``, or, when that is
  None, a ``LocalCluster`` of ``offload.workers`` single-threaded worker processes that the
  service starts and owns. A job whose worker dies is counted lost (the service's own cluster
  does not retry it: ``allowed_failures=0``; an external scheduler applies its own setting).

``fn`` must be a picklable module-level function (processes and dask send it by reference).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from scopestream.daemon._stage import Emission

if TYPE_CHECKING:
    from scopestream.daemon._config import OffloadConfig

log = logging.getLogger(__name__)

BackendName = Literal["processes", "threads", "dask"]
FailReason = Literal["failed", "lost", "teardown"]
OnDone = Callable[[Any], Sequence[Emission]]
OnFail = Callable[[str, str], Sequence[Emission]]

COUNTER_NAMES = (
    "submitted", "accepted", "skipped_busy", "skipped_closed", "done", "failed", "lost",
    "cancelled", "in_flight", "callback_errors",
)


# -- worker side ---------------------------------------------------------------------------------

_PARENT_CHECK_S = 0.2  # a worker outlives a killed daemon by at most this, s
_BLAS_LIMITED = False


def limit_blas_threads() -> None:
    """Make BLAS (and torch, if loaded) in this process single-threaded; idempotent.

    Parallelism comes from the workers, not from BLAS: batched ``eigh`` ran 15× slower with two
    BLAS threads than with one (SCIENCE.md). Uses ``threadpoolctl`` for the libraries already
    loaded and the usual environment variables for those loaded later.
    """
    global _BLAS_LIMITED
    if _BLAS_LIMITED:
        return
    from threadpoolctl import threadpool_limits

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ[name] = "1"
    threadpool_limits(limits=1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    _BLAS_LIMITED = True


def _die_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as its parent (the daemon) is gone, checked every
    ``_PARENT_CHECK_S`` by a daemon thread of the worker.

    Not ``PR_SET_PDEATHSIG``: that signal fires when the parent *thread* that forked the worker
    ends, and the pool spawns its workers from whichever thread submits (the stage thread), so a
    run's end killed the workers with their jobs in flight (counted lost).
    """
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="scopestream-parent-watch", daemon=True).start()


def _init_process_worker(parent_pid: int, niceness: int = 0) -> None:
    """Initializer of a ``processes`` worker: no SIGINT (Ctrl-C reaches the whole process group;
    the daemon shuts the pool down in order), die with the daemon, one BLAS thread, niceness
    raised by ``niceness`` (slow jobs yield the CPU to the camera path)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    limit_blas_threads()
    if niceness:
        try:
            os.nice(niceness)
        except OSError as exc:  # pragma: no cover - raising one's own niceness is always allowed
            log.warning("could not lower the worker's priority: %s", exc)


def _call_limited(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Run ``fn(*args)`` with BLAS limited to one thread (Dask workers have no initializer)."""
    limit_blas_threads()
    return fn(*args)


# -- backends ------------------------------------------------------------------------------------


@runtime_checkable
class OffloadBackend(Protocol):
    """Where jobs run. ``submit`` returns a future that the service polls; ``is_lost`` tells a
    dead worker from a job that raised; ``recover`` rebuilds what a dead worker broke."""

    name: str

    def start(self) -> None:
        """Start workers (may take seconds, e.g. a Dask cluster); called before the first job."""
        ...

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> cf.Future[Any]:
        """Queue ``fn(*args)``; raise :class:`BackendBroken` if the pool cannot take jobs."""
        ...

    def is_lost(self, exc: BaseException) -> bool:
        """Whether a job's exception means its worker died (not that the job raised)."""
        ...

    def recover(self) -> None:
        """Rebuild after a loss (e.g. a broken process pool); no-op where nothing broke."""
        ...

    def close(self, kill: bool) -> None:
        """Release the workers; ``kill``: stop jobs still running rather than let them finish."""
        ...


class BackendBroken(RuntimeError):
    """The backend cannot take jobs until :meth:`OffloadBackend.recover`."""


class ProcessBackend:
    """Spawned worker processes (``concurrent.futures.ProcessPoolExecutor``)."""

    name = "processes"

    def __init__(self, workers: int, start_method: Literal["spawn", "forkserver"] = "spawn", niceness: int = 0) -> None:
        self._workers = workers
        self._niceness = niceness
        self._start_method = start_method
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        # Nothing until the first job: the pool's queues start multiprocessing's resource tracker
        # (a process), which a run without slow stages should not pay for.
        return None

    def _ensure_pool(self) -> None:
        with self._lock:
            if self._pool is None:
                import multiprocessing

                self._pool = cf.ProcessPoolExecutor(
                    max_workers=self._workers,
                    mp_context=multiprocessing.get_context(self._start_method),
                    initializer=_init_process_worker,
                    initargs=(os.getpid(), self._niceness),
                )

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> cf.Future[Any]:
        self._ensure_pool()
        assert self._pool is not None
        try:
            return self._pool.submit(fn, *args)
        except cf.process.BrokenProcessPool as exc:
            raise BackendBroken(str(exc)) from exc

    def is_lost(self, exc: BaseException) -> bool:
        return isinstance(exc, cf.process.BrokenProcessPool)

    def recover(self) -> None:
        with self._lock:
            pool = self._pool
            # A pool whose worker died is broken for good: every job it held is lost. Replace it.
            if pool is None or not getattr(pool, "_broken", False):
                return
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("offload: a worker process died; the process pool was rebuilt")

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (tests, diagnostics)."""
        pool = self._pool
        procs = getattr(pool, "_processes", None) or {}
        return [p.pid for p in list(procs.values()) if p.pid is not None]

    def close(self, kill: bool) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:
            terminate = getattr(pool, "terminate_workers", None)  # Python ≥ 3.14
            if terminate is not None:
                terminate()
                return
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.kill()
        pool.shutdown(wait=not kill, cancel_futures=True)


class ThreadBackend:
    """A thread pool inside the daemon."""

    name = "threads"

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: cf.ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._pool is None:
            limit_blas_threads()  # process-wide: the daemon's own BLAS runs single-threaded too
            self._pool = cf.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="offload")

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> cf.Future[Any]:
        self.start()
        assert self._pool is not None
        return self._pool.submit(fn, *args)

    def is_lost(self, exc: BaseException) -> bool:
        return False

    def recover(self) -> None:
        return None

    def close(self, kill: bool) -> None:
        # Threads cannot be stopped; a running job finishes on its own, its result is dropped.
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class DaskBackend:
    """A ``distributed`` cluster: an existing scheduler, or a ``LocalCluster`` owned here."""

    name = "dask"

    def __init__(self, scheduler_address: str | None, workers: int) -> None:
        self._address = scheduler_address
        self._workers = workers
        self._cluster: Any = None
        self._client: Any = None
        self._futures: dict[cf.Future[Any], Any] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` (after :meth:`start`)."""
        return self._client

    @property
    def cluster(self) -> Any:
        """The owned ``LocalCluster``, or None with an external scheduler."""
        return self._cluster

    def start(self) -> None:
        if self._client is not None:
            return
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise RuntimeError(
                "offload.backend 'dask' needs the 'distributed' package: pip install 'scopestream[dask]'"
            ) from None
        if self._address is None:
            self._cluster = LocalCluster(
                n_workers=self._workers, threads_per_worker=1, processes=True,
                dashboard_address=None, scheduler_kwargs={"allowed_failures": 0},
            )
            self._client = Client(self._cluster, set_as_default=False)
        else:
            self._client = Client(self._address, set_as_default=False, timeout="10s")

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> cf.Future[Any]:
        self.start()
        remote = self._client.submit(_call_limited, fn, args, pure=False)
        local: cf.Future[Any] = cf.Future()
        local.set_running_or_notify_cancel()
        with self._lock:
            self._futures[local] = remote

        def finished(fut: Any) -> None:  # on a distributed callback thread
            try:
                local.set_result(fut.result())
            except BaseException as exc:  # noqa: BLE001 - handed to the service as the job's outcome
                if not local.done():
                    local.set_exception(exc)
            finally:
                with self._lock:
                    self._futures.pop(local, None)

        remote.add_done_callback(finished)
        return local

    def is_lost(self, exc: BaseException) -> bool:
        from distributed import KilledWorker
        from distributed.comm import CommClosedError

        return isinstance(exc, KilledWorker | CommClosedError | cf.CancelledError)

    def recover(self) -> None:
        return None  # the nanny restarts a dead worker; the scheduler keeps going

    def worker_pids(self) -> list[int]:
        """Process ids of the owned cluster's workers (tests, diagnostics)."""
        if self._client is None:
            return []
        return list(self._client.run(os.getpid).values())

    def close(self, kill: bool) -> None:
        with self._lock:
            remotes = list(self._futures.values())
            self._futures.clear()
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        if client is not None:
            if remotes:
                try:
                    client.cancel(remotes)
                except Exception as exc:  # noqa: BLE001 - teardown goes on
                    log.debug("offload: cancelling dask futures failed: %s", exc)
            client.close()
        if cluster is not None:
            cluster.close()


def make_backend(config: OffloadConfig) -> OffloadBackend:
    """The backend that ``config.backend`` names."""
    if config.backend == "processes":
        return ProcessBackend(config.workers, niceness=config.worker_niceness)
    if config.backend == "threads":
        return ThreadBackend(config.workers)
    if config.backend == "dask":
        return DaskBackend(config.scheduler_address, config.workers)
    raise ValueError(f"offload.backend must be 'processes', 'threads' or 'dask', got {config.backend!r}")


# -- the service ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    owner: str
    future: cf.Future[Any]
    on_done: OnDone
    on_fail: OnFail


class Offload:
    """The off-thread service of one run (see the module docstring).

    Parameters
    ----------
    backend
        Where jobs run (:func:`make_backend`).
    max_in_flight_jobs
        Jobs submitted and not yet delivered by :meth:`poll`, at most, over all owners.
    teardown_timeout_s
        Default wait of :meth:`close`.
    """

    def __init__(self, backend: OffloadBackend, max_in_flight_jobs: int = 4,
                 teardown_timeout_s: float = 120.0) -> None:
        if max_in_flight_jobs < 1:
            raise ValueError(f"max_in_flight_jobs must be at least 1, got {max_in_flight_jobs}")
        self.backend = backend
        self.max_in_flight_jobs = int(max_in_flight_jobs)
        self.teardown_timeout_s = float(teardown_timeout_s)
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._counts: dict[str, dict[str, int]] = {}
        self._closed = False
        self._started = False
        self._submitting = 0  # submit() calls between acceptance and the job's record
        self._start_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: OffloadConfig) -> Offload:
        """The service the ``offload`` configuration section describes (not started)."""
        return cls(make_backend(config), config.max_in_flight_jobs, config.teardown_timeout_s)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the backend's workers now (else at the first job); idempotent."""
        with self._start_lock:
            if not self._started:
                self.backend.start()
                self._started = True

    def close(self, timeout_s: float | None = None) -> list[Emission]:
        """End the service: wait at most ``timeout_s`` (default ``teardown_timeout_s``) for jobs
        in flight, deliver them, report the rest through ``on_fail("teardown", ...)`` and release
        the workers. Later submissions are refused (``skipped_closed``)."""
        timeout = self.teardown_timeout_s if timeout_s is None else float(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._submitting:
                self._cond.wait(0.1)
            pending = [job.future for job in self._jobs]
        if pending:
            cf.wait(pending, timeout=max(0.0, timeout))
        emissions = self.poll()
        with self._cond:
            left, self._jobs = self._jobs, []
            for job in left:
                job.future.cancel()
                self._count(job.owner, "cancelled")
                self._count(job.owner, "in_flight", -1)
            self._cond.notify_all()
        for job in left:
            emissions.extend(self._call(job, job.on_fail, "teardown",
                                        f"still in flight after the {timeout:g} s teardown wait"))
        try:
            self.backend.close(kill=bool(left))
        except Exception as exc:  # noqa: BLE001 - teardown must finish
            log.error("offload: closing the %s backend failed: %s", self.backend.name, exc)
        return emissions

    @property
    def closed(self) -> bool:
        return self._closed

    # -- jobs --------------------------------------------------------------------------------
    def submit(
        self,
        owner: str,
        fn: Callable[..., Any],
        *args: Any,
        on_done: OnDone,
        on_fail: OnFail,
        max_in_flight: int | None = None,
        block: bool = False,
    ) -> bool:
        """Run ``fn(*args)`` off the calling thread; False if it was skipped (busy or closed).

        Parameters
        ----------
        owner
            Who submits (the stage name); counters are kept per owner.
        fn, args
            A picklable module-level function and its arguments.
        on_done, on_fail
            Called from :meth:`poll` / :meth:`close` with the result, or with the reason
            (``"failed"``, ``"lost"``, ``"teardown"``) and a detail; each returns emissions.
        max_in_flight
            The owner's own bound on its jobs in flight (besides the service's).
        block
            Wait for room instead of skipping (replay: nothing lost). Room is made by
            :meth:`poll`, so only block where another thread polls (the runner does).
        """
        with self._cond:
            self._count(owner, "submitted")
            while True:
                if self._closed:
                    self._count(owner, "skipped_closed")
                    return False
                if not self._busy(owner, max_in_flight):
                    break
                if not block:
                    self._count(owner, "skipped_busy")
                    return False
                self._cond.wait(0.5)
            self._count(owner, "accepted")
            self._count(owner, "in_flight")
            self._submitting += 1
        future: cf.Future[Any]
        try:
            self.start()
            future = self._submit_backend(fn, args)
        except Exception as exc:  # noqa: BLE001 - a job that cannot even be queued fails, counted
            future = cf.Future()
            future.set_exception(exc)
        finally:
            with self._cond:
                self._jobs.append(_Job(owner, future, on_done, on_fail))
                self._submitting -= 1
                self._cond.notify_all()
        return True

    def _submit_backend(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> cf.Future[Any]:
        try:
            return self.backend.submit(fn, args)
        except BackendBroken:
            self.backend.recover()
            return self.backend.submit(fn, args)

    def _busy(self, owner: str, max_in_flight: int | None) -> bool:
        total = sum(c["in_flight"] for c in self._counts.values())
        if total >= self.max_in_flight_jobs:
            return True
        return max_in_flight is not None and self._counts[owner]["in_flight"] >= max_in_flight

    def poll(self) -> list[Emission]:
        """Deliver every finished job: its ``on_done``/``on_fail`` emissions, in submission order."""
        with self._cond:
            finished = [job for job in self._jobs if job.future.done()]
            if not finished:
                return []
            done_ids = {id(job) for job in finished}
            self._jobs = [job for job in self._jobs if id(job) not in done_ids]
        emissions: list[Emission] = []
        lost = False
        for job in finished:
            try:
                result = job.future.result(timeout=0)
            except BaseException as exc:  # noqa: BLE001 - the job's outcome, reported not raised
                if self.backend.is_lost(exc):
                    lost = True
                    self._settle(job.owner, "lost")
                    detail = f"its worker died ({type(exc).__name__}: {exc})"
                    emissions.extend(self._call(job, job.on_fail, "lost", detail))
                else:
                    self._settle(job.owner, "failed")
                    emissions.extend(self._call(job, job.on_fail, "failed", f"{type(exc).__name__}: {exc}"))
                continue
            self._settle(job.owner, "done")
            emissions.extend(self._call(job, job.on_done, result))
        if lost:
            self.backend.recover()
        return emissions

    def _settle(self, owner: str, outcome: str) -> None:
        with self._cond:
            self._count(owner, outcome)
            self._count(owner, "in_flight", -1)
            self._cond.notify_all()

    def _call(self, job: _Job, callback: Callable[..., Sequence[Emission]], *args: Any) -> list[Emission]:
        try:
            return list(callback(*args))
        except Exception as exc:  # noqa: BLE001 - a stage's callback must not end the housekeeping
            with self._cond:
                n = self._count(job.owner, "callback_errors")
            if n <= 10:
                log.error("offload: a callback of %r raised %s: %s", job.owner, type(exc).__name__, exc)
            return []

    # -- accounting --------------------------------------------------------------------------
    def _count(self, owner: str, name: str, n: int = 1) -> int:
        counts = self._counts.get(owner)
        if counts is None:
            counts = self._counts[owner] = dict.fromkeys(COUNTER_NAMES, 0)
        counts[name] += n
        return counts[name]

    def counters(self, owner: str | None = None) -> Mapping[str, int]:
        """Running totals of ``owner`` (all owners if None): submitted, accepted, skipped_busy,
        skipped_closed, done, failed, lost, cancelled, in_flight, callback_errors."""
        with self._cond:
            if owner is not None:
                return dict(self._counts.get(owner) or dict.fromkeys(COUNTER_NAMES, 0))
            total = dict.fromkeys(COUNTER_NAMES, 0)
            for counts in self._counts.values():
                for k, v in counts.items():
                    total[k] += v
            return total

    def in_flight(self, owner: str | None = None) -> int:
        """Jobs submitted and not yet delivered (of ``owner``, or all)."""
        return self.counters(owner)["in_flight"]

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every job in flight has finished (not delivered: call :meth:`poll`);
        False on timeout. For batch use and tests."""
        with self._cond:
            pending = [job.future for job in self._jobs]
        if not pending:
            return True
        _, not_done = cf.wait(pending, timeout=timeout_s)
        return not not_done

