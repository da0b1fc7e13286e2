"""Per-stage cost per frame of the embedded default, and whether the daemon keeps up with it.

The embedded default (``scopestream run`` with no arguments): the simulated widefield camera,
512 x 512 px, the default scene (~100 particles), 100 frames/s, stages frame_stats, localize,
track, diffusion, musical (and preview, where configured).

Two modes:

``stages`` (default)
    Simulates frames with the same simulator the camera device runs (default configuration, seed
    0), then feeds them to every configured stage in pipeline order, in one thread of this
    process, and prints per stage the thread CPU time and the wall time per frame (mean and
    95th percentile), the cost of encoding each frame's events for the wire, the camera's own
    cost per frame (simulation and the truth JSON it puts in the metadata), the total, and the
    frames/s the stages would sustain on one core as a ratio to the camera's 100 frames/s.
    Decide on the CPU times: wall times are noisy on a shared machine.

``daemon``
    Runs the real :class:`~scopestream.daemon._service.Daemon` on the default configuration
    (ports at 0) for ``--seconds`` at each rate of ``--rates`` (frames/s; exposure = frame
    interval = 1000 / rate ms) and prints frames received / processed / dropped, the stage
    latencies from the daemon's own metrics (histogram sum / count) and the CPU time each thread
    of the process used per received frame (read from /proc).

    OMP_NUM_THREADS=1 python benchmarks/bench_stages.py stages [--frames 300]
    OMP_NUM_THREADS=1 python benchmarks/bench_stages.py daemon [--seconds 20] [--rates 100,200]
        [--switch-interval-ms MS] [--worker-nice N]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CAMERA_FPS = 100.0


def _default_config(*overrides: str) -> Any:
    from scopestream.daemon._config import load_config

    return load_config(None, list(overrides))


def _stats_line(name: str, cpu_s: Sequence[float], wall_s: Sequence[float]) -> str:
    cpu = np.asarray(cpu_s) * 1e3
    wall = np.asarray(wall_s) * 1e3
    return (
        f"{name:<22} cpu {cpu.mean():7.3f} ms (p95 {np.percentile(cpu, 95):7.3f})   "
        f"wall {wall.mean():7.3f} ms (p95 {np.percentile(wall, 95):7.3f})"
    )


# -- stages ---------------------------------------------------------------------------------


def _build_stages(config: Any, frame_shape: tuple[int, int]) -> tuple[list[Any], Callable[[], Any], Any]:
    """The configured stages, built as the runner builds them, and a factory of the per-frame
    products store. Kept thin so that it follows the engine's stage contract."""
    from scopestream.daemon._config import stage_plugins
    from scopestream.daemon._messages import SourceDescription
    from scopestream.daemon._offload import Offload
    from scopestream.daemon._products import Products
    from scopestream.daemon._stage import RunContext, build_stage

    plugins = stage_plugins()
    stages = [build_stage(plugins[name], config, config.stage_settings(name)) for name in config.stages]
    offload = Offload.from_config(config.offload)
    offload.start()
    height, width = frame_shape
    context = RunContext(
        frame_shape_px=(height, width), dtype=np.dtype(np.uint16), pixel_size_nm=config.optics.pixel_size_nm,
        frame_interval_ms=config.acquisition.frame_interval_ms, exposure_ms=config.acquisition.exposure_ms,
        camera=config.camera, optics=config.optics,
        source=SourceDescription(kind="micromanager", detail="bench", camera="Camera", width_px=width,
                                 height_px=height, dtype="uint16", mode="continuous"),
        offload=offload,
    )
    for stage in stages:
        stage.setup(context)
    return stages, Products, offload


def _simulate_frames(config: Any, n_frames: int) -> tuple[list[np.ndarray], list[float], list[float]]:
    """Frames of the camera device's simulator, and its cost per frame (simulation; truth JSON)."""
    from scopestream.sim_camera._simulate import make_simulator
    from scopestream.sim_camera._truth import truth_to_json

    sim = make_simulator(config, "widefield", seed=0)
    frames, sim_cpu, json_cpu = [], [], []
    for _ in range(n_frames):
        buf = np.empty(sim.shape, dtype=np.uint16)
        t0 = time.thread_time()
        _, truth = sim.next_frame(buf)
        t1 = time.thread_time()
        truth_to_json(truth)
        t2 = time.thread_time()
        frames.append(buf)
        sim_cpu.append(t1 - t0)
        json_cpu.append(t2 - t1)
    return frames, sim_cpu, json_cpu


def run_stages(n_frames: int, warmup: int) -> None:
    from scopestream.daemon._frames import Frame
    from scopestream.daemon._messages import encode
    from scopestream.daemon._products import Localizations
    from scopestream.daemon._publish import Envelope

    config = _default_config()
    print(f"stages {config.stages}; {n_frames} frames after {warmup} warm-up frames; "
          f"{os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    frames, sim_cpu, json_cpu = _simulate_frames(config, n_frames + warmup)
    stages, new_products, offload = _build_stages(config, frames[0].shape)
    cpu: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(list)
    seq_by_topic: dict[str, int] = defaultdict(int)
    t_base = time.time()
    for i, image in enumerate(frames):
        frame = Frame(i, image, t_base + i / CAMERA_FPS, i, {})
        products = new_products()
        emitted = []
        for stage in stages:
            w0, c0 = time.perf_counter(), time.thread_time()
            emissions = stage.process(frame, products)
            c1, w1 = time.thread_time(), time.perf_counter()
            emitted.extend(emissions)
            if i >= warmup:
                cpu[stage.name].append(c1 - c0)
                wall[stage.name].append(w1 - w0)
        w0, c0 = time.perf_counter(), time.thread_time()
        for em in emitted:
            seq = seq_by_topic[em.topic]
            seq_by_topic[em.topic] = seq + 1
            env = Envelope("bench", em.topic, seq, em.body, em.arrays, em.frame_seq, em.t_acquired)
            encode(env.header(time.time()), env.body, env.arrays)
        c1, w1 = time.thread_time(), time.perf_counter()
        w2, c2 = time.perf_counter(), time.thread_time()
        done = offload.poll()  # the housekeeping tick's work: off-thread results turned into events
        c3, w3 = time.thread_time(), time.perf_counter()
        if i >= warmup:
            cpu["(offload poll)"].append(c3 - c2)
            wall["(offload poll)"].append(w3 - w2)
            counts["offload events"].append(len(done))
            cpu["(encode events)"].append(c1 - c0)
            wall["(encode events)"].append(w1 - w0)
            counts["events"].append(len(emitted))
            loc = products.get(Localizations)
            if loc is not None:
                counts["localizations"].append(len(loc))
    for stage in stages:
        teardown = getattr(stage, "teardown", None)
        if teardown is not None:
            teardown()
    offload.close(10.0)
    total_cpu = np.sum([np.asarray(v) for v in cpu.values()], axis=0)
    total_wall = np.sum([np.asarray(v) for v in wall.values()], axis=0)
    print(f"events per frame {np.mean(counts['events']):.2f}"
          + (f"; localizations per frame {np.mean(counts['localizations']):.1f}" if counts["localizations"] else ""))
    for name in cpu:
        print(_stats_line(name, cpu[name], wall[name]))
    print(_stats_line("TOTAL stage thread", total_cpu, total_wall))
    cam = np.asarray(sim_cpu[warmup:]) + np.asarray(json_cpu[warmup:])
    print(f"camera (same process)  cpu {cam.mean() * 1e3:7.3f} ms: simulation {np.mean(sim_cpu[warmup:]) * 1e3:.3f}, "
          f"truth JSON {np.mean(json_cpu[warmup:]) * 1e3:.3f}")
    fps = 1.0 / total_cpu.mean()
    print(f"stage thread alone: {fps:6.1f} frames/s on one core = {fps / CAMERA_FPS:.2f} x the camera's {CAMERA_FPS:.0f} frames/s")
    both = 1.0 / (total_cpu.mean() + cam.mean())
    print(f"stages + camera on one core: {both:6.1f} frames/s = {both / CAMERA_FPS:.2f} x the camera's rate")


# -- daemon ---------------------------------------------------------------------------------


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of every live Python thread of this process, by name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        tid = t.native_id
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t.name] = out.get(t.name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _children_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of each child process of this process (the MUSICAL worker
    pool, the multiprocessing resource tracker), by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                pids.update(int(p) for p in fh.read().split())
        except OSError:
            continue
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _histogram_means(metrics: Any) -> dict[str, tuple[float, float]]:
    """Per stage: (mean latency s, observations) from the stage latency histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in metrics.stage_latency.collect():
        for sample in family.samples:
            stage = sample.labels.get("stage")
            if sample.name.endswith("_sum"):
                sums[stage] = sample.value
            elif sample.name.endswith("_count"):
                counts[stage] = sample.value
    return {s: (sums[s] / counts[s] if counts.get(s) else float("nan"), counts.get(s, 0.0)) for s in sums}


def _renice_children(stop: threading.Event, niceness: int) -> None:
    """Lower the priority of every child process (the MUSICAL workers) as they appear: an
    experiment for ``--worker-nice``, what a worker initializer calling ``os.nice`` would do."""
    done: set[int] = set()
    while not stop.wait(0.2):
        for pid in _children_cpu_s():
            if pid not in done:
                try:
                    os.setpriority(os.PRIO_PROCESS, pid, niceness)
                except OSError:
                    continue
                done.add(pid)


def run_daemon(rate_hz: float, seconds: float, worker_nice: int | None = None) -> dict[str, Any]:
    from scopestream.daemon._service import Daemon

    interval_ms = 1000.0 / rate_hz
    config = _default_config(
        "events.endpoint=tcp://127.0.0.1:0", "control.endpoint=tcp://127.0.0.1:0", "metrics.port=0",
        f"acquisition.frame_interval_ms={interval_ms}", f"acquisition.exposure_ms={interval_ms}",
    )
    daemon = Daemon(config)
    stop_renice = threading.Event()
    if worker_nice is not None:
        threading.Thread(target=_renice_children, args=(stop_renice, worker_nice), daemon=True).start()
    daemon.start()
    time.sleep(2.0)  # start-up (the camera's first frames, the MUSICAL pool) is not counted below
    st0 = daemon.status()
    cpu0, proc0, kids0, w0 = _thread_cpu_s(), time.process_time(), _children_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    st1 = daemon.status()
    cpu1, proc1, kids1, w1 = _thread_cpu_s(), time.process_time(), _children_cpu_s(), time.perf_counter()
    latency = _histogram_means(daemon.metrics)
    stop = daemon.close()
    stop_renice.set()
    received = st1.frames_received - st0.frames_received
    return {
        "rate_hz": rate_hz,
        "seconds": w1 - w0,
        "received": received,
        "processed": st1.frames_processed - st0.frames_processed,
        "dropped": st1.frames_dropped - st0.frames_dropped,
        "stop": stop,
        "latency": latency,
        "thread_cpu_ms_per_frame": {k: (cpu1.get(k, 0.0) - v) * 1e3 / max(received, 1) for k, v in cpu0.items()},
        "process_cpu_ms_per_frame": (proc1 - proc0) * 1e3 / max(received, 1),
        "children_cpu_s_per_s": sum(v - kids0.get(pid, 0.0) for pid, v in kids1.items()) / (w1 - w0),
    }


def print_daemon(res: dict[str, Any]) -> None:
    stop = res["stop"]
    print(f"\n== daemon at {res['rate_hz']:.0f} frames/s, {res['seconds']:.1f} s measured (after 2 s start-up)")
    print(f"   measured window: received {res['received']}, processed {res['processed']}, dropped {res['dropped']} "
          f"({100.0 * res['dropped'] / max(res['received'], 1):.1f} %); processed/s {res['processed'] / res['seconds']:.1f} "
          f"= {res['processed'] / res['seconds'] / res['rate_hz']:.2f} x the camera's rate")
    if stop is not None:
        print(f"   whole run (run_stop): received {stop.frames_received}, processed {stop.frames_processed}, "
              f"dropped {stop.frames_dropped} {dict(stop.frames_dropped_by_reason)}")
    total = 0.0
    for name, (mean_s, n) in res["latency"].items():
        total += mean_s
        print(f"   stage {name:<12} mean {mean_s * 1e3:7.3f} ms over {n:.0f} frames (wall, from the metrics)")
    print(f"   stages total mean {total * 1e3:.3f} ms per frame; frame interval {1000.0 / res['rate_hz']:.1f} ms")
    stage_ms = res["thread_cpu_ms_per_frame"].get("scopestream-stages", 0.0) * res["received"] / max(res["processed"], 1)
    print(f"   stage thread CPU {stage_ms:.3f} ms per processed frame")
    print(f"   process CPU {res['process_cpu_ms_per_frame']:.3f} ms per received frame; by thread:")
    for name, ms in sorted(res["thread_cpu_ms_per_frame"].items(), key=lambda kv: -kv[1]):
        if ms >= 0.005:
            print(f"      {name:<32} {ms:7.3f} ms")
    print(f"   child processes (MUSICAL workers): {res['children_cpu_s_per_s']:.2f} CPU seconds per second")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("stages", "daemon"), default="stages")
    parser.add_argument("--frames", type=int, default=300, help="stages mode: frames measured")
    parser.add_argument("--warmup", type=int, default=30, help="stages mode: frames run before measuring")
    parser.add_argument("--seconds", type=float, default=20.0, help="daemon mode: seconds measured per rate")
    parser.add_argument("--rates", default="100,200", help="daemon mode: camera rates, frames/s")
    parser.add_argument(
        "--switch-interval-ms", type=float, default=None,
        help="daemon mode: sys.setswitchinterval for this process, ms (default: leave as it is)",
    )
    parser.add_argument(
        "--worker-nice", type=int, default=None,
        help="daemon mode: renice the child processes (MUSICAL workers) to this niceness as they start",
    )
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    print(f"GIL switch interval {sys.getswitchinterval() * 1e3:.3f} ms")
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "load average", os.getloadavg())
    if args.mode == "stages":
        run_stages(args.frames, args.warmup)
    else:
        for rate in (float(r) for r in args.rates.split(",")):
            print_daemon(run_daemon(rate, args.seconds, args.worker_nice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
