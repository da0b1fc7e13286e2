"""MUSICAL windows per second through each backend of the engine's off-thread service.

Run:  .venv/bin/python benchmarks/bench_offload.py [--windows 8] [--workers 2]

The same ``--windows`` MUSICAL windows of 25×25 px × 200 frames at sub 10 (the live stage's job,
``plugins/musical.py::_run_window_job``) go through

- ``serial``: called one after another in this process (the reference: no service);
- ``threads``, ``processes``, ``dask``: :class:`scopestream.daemon._offload.Offload` with
  ``--workers`` workers, all windows allowed in flight, polled every 5 ms as the runner's
  housekeeping tick would.

For each: wall time and windows/s (start-up excluded and reported apart: spawning processes,
starting a LocalCluster), CPU time of this process and of its child processes (workers, nannies,
the resource tracker) over the same interval, and the ratio to serial. Wall time is noisy on a
shared machine; CPU time says how much work each way costs.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from scopestream.daemon._offload import DaskBackend, Offload, ProcessBackend, ThreadBackend  # noqa: E402
from scopestream.plugins import musical as mus  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_musical import LAMBDA_NM, NA, PX_NM, THRESHOLD, vesicle_movie  # noqa: E402


def cpu_s() -> float:
    """CPU seconds of this process and all its descendants (live ones)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return total


def run_through(offload: Offload, jobs: list[mus._WindowJob]) -> tuple[float, float, list[np.ndarray]]:
    images: dict[int, np.ndarray] = {}
    c0, t0 = cpu_s(), time.perf_counter()
    for i, job in enumerate(jobs):
        assert offload.submit("musical", mus._run_window_job, job,
                              on_done=lambda r, i=i: images.update({i: r[0]}) or [],
                              on_fail=lambda reason, detail: sys.exit(f"window failed: {reason}: {detail}"))
    while len(images) < len(jobs):
        offload.poll()
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    return wall, cpu_s() - c0, [images[i] for i in range(len(jobs))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    movies = [vesicle_movie(200, 25, seed=10 + i) for i in range(args.windows)]
    jobs = [mus._WindowJob(m, float(m.max()), LAMBDA_NM, NA, PX_NM, 10, THRESHOLD, 4.0, "numpy", "cpu")
            for m in movies]
    print(f"{datetime.date.today()}  {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{args.windows} windows of 25×25×200 at sub 10, {args.workers} workers")
    mus._run_window_job(jobs[0])  # geometry and operands cached outside the timing
    c0, t0 = cpu_s(), time.perf_counter()
    reference = [mus._run_window_job(j)[0] for j in jobs]
    serial_wall, serial_cpu = time.perf_counter() - t0, cpu_s() - c0
    print(f"  {'serial':9s}: wall {serial_wall:6.2f} s  {args.windows / serial_wall:5.2f} windows/s  "
          f"CPU {serial_cpu:6.2f} s  (reference)")
    for name in ("threads", "processes", "dask"):
        backend = {"threads": lambda: ThreadBackend(args.workers),
                   "processes": lambda: ProcessBackend(args.workers),
                   "dask": lambda: DaskBackend(None, args.workers)}[name]()
        offload = Offload(backend, max_in_flight_jobs=args.windows)
        t0 = time.perf_counter()
        offload.start()
        run_through(offload, jobs[: args.workers])  # workers spawned, imports and G warm
        startup = time.perf_counter() - t0
        wall, cpu, images = run_through(offload, jobs)
        offload.close(30)
        err = max(float(np.max(np.abs(a - b) / np.abs(b))) for a, b in zip(images, reference, strict=True))
        print(f"  {name:9s}: wall {wall:6.2f} s  {args.windows / wall:5.2f} windows/s  CPU {cpu:6.2f} s  "
              f"| ×serial: speed {serial_wall / wall:4.2f}, CPU {cpu / serial_cpu:4.2f} | start-up {startup:5.2f} s "
              f"| max rel. diff to serial {err:.1e}")


if __name__ == "__main__":
    main()
