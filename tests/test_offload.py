"""The engine's off-thread service (daemon/_offload.py) against real pools: spawned processes,
threads, a real ``distributed.LocalCluster`` with worker processes, and a real daemon killed with
``kill -9``.

Every test checks the service's accounting identity, per owner::

    submitted = skipped_busy + skipped_closed + done + failed + lost + cancelled + in_flight
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tifffile

from scopestream.daemon._config import ConfigError, load_config
from scopestream.daemon._offload import (
    DaskBackend,
    Offload,
    ProcessBackend,
    ThreadBackend,
    make_backend,
)
from scopestream.daemon._stage import Emission

sys.path.insert(0, str(Path(__file__).parent))
import offload_jobs as jobs  # noqa: E402

OUTCOMES = ("skipped_busy", "skipped_closed", "done", "failed", "lost", "cancelled", "in_flight")


def assert_counts_add_up(counts: Mapping[str, int]) -> None:
    assert counts["submitted"] == sum(counts[k] for k in OUTCOMES), dict(counts)
    assert counts["accepted"] == counts["submitted"] - counts["skipped_busy"] - counts["skipped_closed"]


class Recorder:
    """Callbacks that record what they were given (and on which thread), emitting nothing."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.failures: list[tuple[str, str]] = []
        self.threads: set[str] = set()

    def on_done(self, result: Any) -> list[Emission]:
        self.threads.add(threading.current_thread().name)
        self.results.append(result)
        return []

    def on_fail(self, reason: str, detail: str) -> list[Emission]:
        self.threads.add(threading.current_thread().name)
        self.failures.append((reason, detail))
        return []

    def submit(self, offload: Offload, fn: Any, *args: Any, owner: str = "stage", **kw: Any) -> bool:
        return offload.submit(owner, fn, *args, on_done=self.on_done, on_fail=self.on_fail, **kw)


def drain(offload: Offload, timeout_s: float = 60.0) -> None:
    assert offload.wait_idle(timeout_s)
    offload.poll()


@pytest.fixture(params=["processes", "threads"])
def local(request: pytest.FixtureRequest) -> Iterator[Offload]:
    backend = ProcessBackend(2) if request.param == "processes" else ThreadBackend(2)
    offload = Offload(backend, max_in_flight_jobs=3, teardown_timeout_s=30)
    yield offload
    offload.close(5)


# -- local backends ------------------------------------------------------------------------------


def test_results_failures_and_counts(local: Offload) -> None:
    rec = Recorder()
    for v in (1.0, 2.0, 3.0):
        assert rec.submit(local, jobs.square_after, v)
    drain(local)
    assert rec.submit(local, jobs.raise_value_error, "bad window")
    drain(local)
    assert sorted(rec.results) == [1.0, 4.0, 9.0]
    assert rec.failures == [("failed", "ValueError: bad window")]
    # Callbacks run on the thread that polls (here the test's), never on a worker.
    assert rec.threads == {threading.current_thread().name}
    counts = local.counters("stage")
    assert (counts["done"], counts["failed"], counts["in_flight"]) == (3, 1, 0)
    assert_counts_add_up(counts)


def test_busy_jobs_are_skipped_and_counted(local: Offload) -> None:
    """More submissions than the bound: exactly the bound is accepted, the rest skipped and
    counted per owner; the owner's own bound applies besides the service's."""
    rec = Recorder()
    accepted = [rec.submit(local, jobs.square_after, float(i), 1.0) for i in range(5)]
    assert accepted == [True, True, True, False, False]  # max_in_flight_jobs = 3
    assert not rec.submit(local, jobs.square_after, 0.0, owner="other")  # the service is full
    counts = local.counters("stage")
    assert (counts["submitted"], counts["accepted"], counts["skipped_busy"], counts["in_flight"]) == (5, 3, 2, 3)
    assert local.counters("other")["skipped_busy"] == 1
    assert local.poll() == [] and rec.results == []  # nothing finished after 1 s jobs started
    drain(local)
    assert sorted(rec.results) == [0.0, 1.0, 4.0]
    # An owner bound of 1: the second job of that owner waits for the first to be delivered.
    assert rec.submit(local, jobs.square_after, 5.0, 0.2, owner="slow", max_in_flight=1)
    assert not rec.submit(local, jobs.square_after, 6.0, owner="slow", max_in_flight=1)
    assert rec.submit(local, jobs.square_after, 7.0, owner="fast", max_in_flight=1)
    drain(local)
    for owner in ("stage", "other", "slow", "fast"):
        assert_counts_add_up(local.counters(owner))
    total = local.counters()
    assert total["done"] == 5 and total["skipped_busy"] == 4


def test_block_waits_for_room_made_by_poll() -> None:
    """``block=True`` (replay): the submission waits until a poll delivers a job, loses nothing."""
    offload = Offload(ThreadBackend(1), max_in_flight_jobs=1)
    rec = Recorder()
    stop = threading.Event()

    def housekeeping() -> None:
        while not stop.wait(0.01):
            offload.poll()

    tick = threading.Thread(target=housekeeping, name="housekeeping")
    tick.start()
    try:
        for v in range(6):
            assert rec.submit(offload, jobs.square_after, float(v), 0.02, block=True)
    finally:
        stop.set()
        tick.join()
    offload.close(10)
    assert sorted(rec.results) == [float(v * v) for v in range(6)]
    assert offload.counters("stage")["skipped_busy"] == 0 and rec.threads <= {"housekeeping", "MainThread"}


def test_process_workers_run_single_threaded_blas() -> None:
    offload = Offload(ProcessBackend(1))
    rec = Recorder()
    assert rec.submit(offload, jobs.blas_threads)
    drain(offload)
    offload.close(5)
    assert rec.results and rec.results[0] and set(rec.results[0]) == {1}


def test_process_workers_run_nicer_than_the_daemon_by_the_configured_amount() -> None:
    # The camera path must win the CPU on a busy machine: workers run offload.worker_niceness
    # nicer than the daemon (the default config's value, and 0 = same priority).
    from scopestream.daemon._config import OffloadConfig
    from scopestream.daemon._offload import make_backend

    own = os.nice(0)
    for niceness in (OffloadConfig().worker_niceness, 0):
        assert OffloadConfig().worker_niceness == 10
        offload = Offload(make_backend(OffloadConfig(worker_niceness=niceness)))
        rec = Recorder()
        assert rec.submit(offload, jobs.niceness)
        drain(offload)
        offload.close(5)
        assert rec.results == [min(own + niceness, 19)]


def test_broken_process_pool_is_rebuilt_and_its_jobs_counted_lost() -> None:
    offload = Offload(ProcessBackend(1), max_in_flight_jobs=4)
    rec = Recorder()
    assert rec.submit(offload, jobs.kill_own_process, 0.5)
    assert rec.submit(offload, jobs.square_after, 3.0)  # queued behind the job that kills its worker
    drain(offload)
    # A dead worker breaks the whole pool: both jobs it held are lost, none is reported done.
    assert [r for r, _ in rec.failures] == ["lost", "lost"] and rec.results == []
    assert "worker died" in rec.failures[0][1]
    assert rec.submit(offload, jobs.square_after, 4.0)  # the run goes on, on a new pool
    drain(offload)
    assert rec.results == [16.0]
    counts = offload.counters("stage")
    assert (counts["lost"], counts["done"]) == (2, 1)
    assert_counts_add_up(counts)
    offload.close(5)


def test_teardown_waits_at_most_its_timeout_then_reports_and_kills() -> None:
    offload = Offload(ProcessBackend(1), teardown_timeout_s=60)
    rec = Recorder()
    assert rec.submit(offload, jobs.pid_after, 0.1)
    drain(offload)
    worker = psutil.Process(rec.results[0])
    assert rec.submit(offload, jobs.square_after, 2.0, 0.3)  # finishes within the wait
    assert rec.submit(offload, jobs.square_after, 3.0, 60.0)  # does not
    t0 = time.monotonic()
    offload.close(timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0
    assert rec.results[1:] == [4.0]
    assert rec.failures == [("teardown", "still in flight after the 1 s teardown wait")]
    assert not rec.submit(offload, jobs.square_after, 1.0)  # closed: refused and counted
    counts = offload.counters("stage")
    assert (counts["cancelled"], counts["skipped_closed"], counts["in_flight"]) == (1, 1, 0)
    assert_counts_add_up(counts)
    # The worker still computing was stopped, not left to finish its minute.
    psutil.wait_procs([worker], timeout=5)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


def test_a_raising_callback_is_counted_not_fatal() -> None:
    offload = Offload(ThreadBackend(1))

    def bad(_: Any) -> list[Emission]:
        raise KeyError("stage bug")

    assert offload.submit("stage", jobs.echo, 1, on_done=bad, on_fail=lambda r, d: [])
    drain(offload)
    assert offload.counters("stage")["callback_errors"] == 1 and offload.counters("stage")["done"] == 1
    offload.close(1)


def test_offload_config_section() -> None:
    config = load_config(None, ["offload.backend=dask", "offload.workers=3", "offload.max_in_flight_jobs=8"])
    assert (config.offload.backend, config.offload.workers, config.offload.max_in_flight_jobs) == ("dask", 3, 8)
    backend = make_backend(config.offload)
    assert isinstance(backend, DaskBackend)
    assert isinstance(make_backend(load_config().offload), ProcessBackend)  # the default
    with pytest.raises(ConfigError, match="scheduler_address"):
        load_config(None, ["offload.scheduler_address=tcp://10.0.0.5:8786"])  # backend processes
    with pytest.raises(ConfigError, match="offload.backend"):
        load_config(None, ["offload.backend=gpu"])
    with pytest.raises(ConfigError, match="offload.max_in_flight_jobs"):
        load_config(None, ["offload.max_in_flight_jobs=0"])


# -- Dask: a real LocalCluster with worker processes --------------------------------------------


@pytest.fixture(scope="module")
def dask_offload() -> Iterator[Offload]:
    pytest.importorskip("distributed")
    offload = Offload(DaskBackend(None, 2), max_in_flight_jobs=2)
    offload.start()
    yield offload
    offload.close(10)


def musical_stacks() -> list[np.ndarray]:
    """Three normalized stacks of blinking emitters (the MUSICAL tests' kind of data)."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(3):
        truth = rng.uniform(4, 10, (3, 2))
        on = rng.random((40, 3)) < 0.5
        yy, xx = np.mgrid[0:14, 0:14]
        frames = 10.0 + np.einsum("ke,eyx->kyx", 2000.0 * on, np.exp(
            -((yy[None] - truth[:, 0, None, None]) ** 2 + (xx[None] - truth[:, 1, None, None]) ** 2) / (2 * 0.9**2)))
        stack = rng.poisson(frames).astype(np.float64)
        out.append(stack / stack.max())
    return out


def test_dask_gives_the_same_musical_images_as_local_processes(dask_offload: Offload) -> None:
    stacks = musical_stacks()
    images: dict[str, dict[int, np.ndarray]] = {}
    local = Offload(ProcessBackend(2), max_in_flight_jobs=3)
    for name, offload in (("dask", dask_offload), ("processes", local)):
        got: dict[int, np.ndarray] = {}
        for i, stack in enumerate(stacks):
            while not offload.submit("musical", jobs.musical_window, stack, 5, -1.0,
                                     on_done=lambda im, i=i, got=got: got.update({i: im}) or [],
                                     on_fail=lambda r, d: pytest.fail(f"{r}: {d}")):
                drain(offload)  # busy: deliver, then submit again
        drain(offload)
        images[name] = got
    local.close(5)
    assert sorted(images["dask"]) == sorted(images["processes"]) == [0, 1, 2]
    for i in range(3):
        a, b = images["dask"][i], images["processes"][i]
        assert a.shape == (70, 70)
        # Same code and single-threaded BLAS on both sides: equal to float64 rounding.
        assert np.max(np.abs(a - b) / np.abs(b)) < 1e-10
    assert_counts_add_up(dask_offload.counters("musical"))


def test_dask_skip_counting_is_honest_when_the_cluster_is_slow(dask_offload: Offload) -> None:
    """Jobs arrive every 20 ms and take 0.3 s on 2 workers with 2 in flight allowed: most are
    skipped. Every skip is counted (skipped = submitted − accepted), every accepted job is
    delivered, and the identity holds at every step."""
    rec = Recorder()
    owner = "slow_cluster"
    accepted = 0
    t_end = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < t_end:
        accepted += rec.submit(dask_offload, jobs.square_after, float(n), 0.3, owner=owner)
        n += 1
        dask_offload.poll()
        counts = dask_offload.counters(owner)
        assert_counts_add_up(counts)
        assert counts["in_flight"] <= 2
        time.sleep(0.02)
    drain(dask_offload)
    counts = dask_offload.counters(owner)
    assert counts["submitted"] == n and counts["accepted"] == accepted
    assert counts["skipped_busy"] == n - accepted and counts["done"] == accepted == len(rec.results)
    # Capacity: 2 jobs per 0.3 s (plus the poll and transfer lag) over 2 s: ≤ 2·2/0.3 + 2 ≈ 15.
    assert 2 <= accepted <= 16 and n - accepted >= n // 2
    assert_counts_add_up(counts)


def test_dask_worker_killed_mid_run_costs_its_jobs_not_the_run(dask_offload: Offload) -> None:
    backend = dask_offload.backend
    assert isinstance(backend, DaskBackend)
    client = backend.client
    rec = Recorder()
    owner = "killed"
    assert rec.submit(dask_offload, jobs.square_after, 2.0, 3.0, owner=owner)
    assert rec.submit(dask_offload, jobs.square_after, 3.0, 3.0, owner=owner)
    # Wait until both run (one per worker), then kill one worker process, as the OOM killer would.
    deadline = time.monotonic() + 10
    while sum(len(v) for v in client.processing().values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = client.run(os.getpid)
    busy = [addr for addr, keys in client.processing().items() if keys]
    assert busy
    os.kill(pids[busy[0]], signal.SIGKILL)
    drain(dask_offload, 30)
    counts = dask_offload.counters(owner)
    # The killed worker's job is lost (the service's own cluster does not retry it); the other
    # worker's job completes.
    assert (counts["lost"], counts["done"]) == (1, 1), dict(counts)
    assert [r for r, _ in rec.failures] == ["lost"] and "KilledWorker" in rec.failures[0][1]
    # The run goes on: the nanny restarts the worker and new jobs are computed.
    for v in (4.0, 5.0):
        assert rec.submit(dask_offload, jobs.square_after, v, owner=owner)
    drain(dask_offload, 30)
    assert sorted(rec.results)[-2:] == [16.0, 25.0]
    assert_counts_add_up(dask_offload.counters(owner))


# -- orphans: kill -9 of a daemon that has MUSICAL windows running -------------------------------


def test_kill_9_of_the_daemon_leaves_no_child_process(tmp_path: Path) -> None:
    """A real daemon (``scopestream run``) replays a stack with full-field MUSICAL windows in 2
    worker processes; ``kill -9`` of the daemon must take every child with it (the workers die
    with their parent; multiprocessing's resource tracker ends when they are gone)."""
    rng = np.random.default_rng(0)
    stack = rng.poisson(100.0, (400, 32, 32)).astype(np.uint16)
    movie = tmp_path / "movie.tif"
    tifffile.imwrite(movie, stack)
    exe = Path(sys.executable).with_name("scopestream")
    cmd = [
        str(exe), "run",
        "--set", "source.kind=file", "--set", f"source.file_path={movie}", "--set", "source.replay_fps=100",
        "--set", "stages=[musical]", "--set", "musical.window_frames=10",
        "--set", "musical.full_field_every_frames=10", "--set", "musical.full_field_subpixels=20",
        "--set", "offload.workers=2",
        "--set", "events.endpoint=tcp://127.0.0.1:0", "--set", "control.endpoint=tcp://127.0.0.1:0",
        "--set", "metrics.enabled=false",
    ]
    daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own group: the test's Ctrl-C stays out
    try:
        proc = psutil.Process(daemon.pid)
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [p for p in proc.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(0.1)
        assert len(workers) == 2, "the MUSICAL workers did not start"
        time.sleep(1.0)  # windows being computed
        children = proc.children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "resource_tracker" in names  # the tracker exists, and must go too
        # Each worker was busy (CPU time) when the daemon was killed.
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        _, alive = psutil.wait_procs(children, timeout=5)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"orphans after kill -9: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)


# -- the runner publishes off-thread results from its housekeeping tick ---------------------------


def test_musical_image_is_published_while_the_run_is_paused(
    tmp_path: Path, make_config: Any, daemons: list[Any]
) -> None:
    """A real daemon: a full-field MUSICAL window is submitted, the run is paused (no frame reaches
    the stages any more), and the image is still published: from the housekeeping tick."""
    from scopestream.client import Subscriber
    from scopestream.daemon._service import Daemon

    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "s.tif", rng.poisson(200.0, (400, 32, 32)).astype(np.uint16))
    config = make_config(
        "source.kind=file", f"source.file_path={tmp_path / 's.tif'}", "source.replay_fps=50",
        "stages=[musical]", "musical.window_frames=20", "musical.full_field_every_frames=200",
        "musical.full_field_subpixels=12", "offload.backend=threads", "events.wait_for_subscriber_s=10",
    )
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint, ["musical", "musical_skipped", "run_stop"])
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(10)
    starter.join(10)
    runner = daemon.runner
    deadline = time.monotonic() + 20
    while runner.offload.counters("musical")["accepted"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.pause()  # the window (frames 0-19, ~1 s of work at sub 12) is still being computed
    assert runner.offload.in_flight("musical") == 1
    time.sleep(0.3)  # the bus drains; from here on no frame reaches the stages
    processed = runner.status().frames_processed
    msg = sub.recv(30)
    assert msg is not None and msg.topic == "musical"
    assert (msg.body["frame_start"], msg.body["frame_end"]) == (0, 19)
    assert msg.arrays["image"].shape == (32 * 12, 32 * 12)
    status = runner.status()
    assert status.state.value == "paused" and status.frames_processed == processed
    daemon.stop()
    assert daemon.wait(30)


def test_workers_outlive_the_thread_that_spawned_them() -> None:
    # The pool spawns its workers from the thread that submits first (the stage thread, which
    # ends with the run); a worker must die with the daemon, not with that thread, or the jobs
    # in flight at the end of a run are lost (PR_SET_PDEATHSIG is per thread).
    offload = Offload(ProcessBackend(1))
    rec = Recorder()

    def stage_thread() -> None:  # submits first, and ends only after the worker is up
        assert rec.submit(offload, jobs.pid_after, 0.0)
        deadline = time.monotonic() + 60
        while not rec.results and time.monotonic() < deadline:
            offload.poll()
            time.sleep(0.01)

    first = threading.Thread(target=stage_thread)
    first.start()
    first.join()
    assert len(rec.results) == 1
    assert rec.submit(offload, jobs.square_after, 3.0, 1.0)  # in flight after the thread ended
    drain(offload)
    offload.close(10)
    counts = offload.counters("stage")
    assert counts["lost"] == 0 and counts["done"] == 2 and 9.0 in rec.results
