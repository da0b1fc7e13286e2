"""Throughput and camera-to-subscriber latency of the daemon.

512 x 512 uint16 frames from a pymmcore-plus Python camera paced at 1 ms exposure, the
frame-statistics stage, a subscriber in another process. Side by side in one run:

- reference: the same camera drained by a bare pymmcore-plus loop (no analysis, no ZeroMQ);
- scopestream: the full daemon (bus, stage, event stream, metrics).

Target (issue 2): 1000 frames/s sustained with no drops, p99 camera->subscriber <= 2 ms.

    python benchmarks/bench_daemon.py [--seconds 10] [--exposure-ms 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("UNICORE_SEQUENCE_BUFFER_MB", "256")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CFG = """# pymmcore-plus Python camera for the benchmark
#py pyDevice,Camera,paced_camera,PacedCamera
#py Property,Core,Initialize,1
#py Property,Core,Camera,Camera
"""


def write_cfg(folder: Path) -> Path:
    path = folder / "paced.cfg"
    path.write_text(CFG)
    return path


def bare_core(cfg: Path, seconds: float, exposure_ms: float) -> dict[str, float]:
    from pymmcore_plus.experimental.unicore import UniMMCore

    core = UniMMCore()
    core.loadSystemConfiguration(str(cfg))
    core.setExposure(exposure_ms)
    lat = []
    n = 0
    core.startContinuousSequenceAcquisition(0)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if core.getRemainingImageCount():
            _, md = core.popNextImageAndMD()
            lat.append(time.time() - float(dict(md)["scopestream_t_acquired_s"]))
            n += 1
        else:
            time.sleep(0.0002)
    elapsed = time.perf_counter() - t0
    core.stopSequenceAcquisition()
    core.unloadAllDevices()
    a = np.array(lat) * 1e3
    return {"fps": n / elapsed, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "frames": n}


def subscriber(endpoint: str, out: str, ready: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    from scopestream.daemon.client import Subscriber

    lat = []
    inside = []
    with Subscriber(endpoint, ["frame_stats", "run_stop"]) as sub:
        sub.wait_ready(30)
        ready.set()
        for msg in sub:
            if msg.topic == "run_stop":
                stop = msg.body
                break
            lat.append(time.time() - msg.header.t_acquired)
            inside.append(msg.header.t_published - msg.header.t_acquired)
        gaps = sub.gaps
    Path(out).write_text(json.dumps({"lat_s": lat, "inside_s": inside, "stop": stop, "gaps": gaps}))


def daemon_run(cfg: Path, seconds: float, exposure_ms: float, folder: Path) -> dict[str, float]:
    from scopestream.daemon._config import load_config
    from scopestream.daemon._service import Daemon

    config = load_config(None, [
        f"source.mm_config={cfg}", f"acquisition.exposure_ms={exposure_ms}", f"acquisition.frame_interval_ms={exposure_ms}",
        "stages=[frame_stats]", "events.endpoint=tcp://127.0.0.1:0", "control.endpoint=tcp://127.0.0.1:0",
        "metrics.port=0", "events.wait_for_subscriber_s=30", "bus.capacity_frames=256",
    ])
    daemon = Daemon(config)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    out = folder / "sub.json"
    proc = ctx.Process(target=subscriber, args=(daemon.events_endpoint, str(out), ready))
    proc.start()
    daemon.start()
    ready.wait(30)
    t0 = time.perf_counter()
    time.sleep(seconds)
    daemon.stop()
    daemon.wait(60)
    elapsed = time.perf_counter() - t0
    daemon.close()
    proc.join(60)
    res = json.loads(out.read_text())
    stop = res["stop"]
    lat = np.array(res["lat_s"]) * 1e3
    inside = np.array(res["inside_s"]) * 1e3
    return {
        "inside_p50_ms": float(np.percentile(inside, 50)),
        "inside_p99_ms": float(np.percentile(inside, 99)),
        "wire_p99_ms": float(np.percentile(lat - inside, 99)),
        "fps": stop["frames_received"] / elapsed,
        "frames_received": stop["frames_received"],
        "frames_processed": stop["frames_processed"],
        "frames_dropped": stop["frames_dropped"],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "subscriber_gaps": sum(res["gaps"].values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--exposure-ms", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = write_cfg(folder)
        ref = bare_core(cfg, args.seconds, args.exposure_ms)
        ours = daemon_run(cfg, args.seconds, args.exposure_ms, folder)
    print(f"512x512 uint16, exposure {args.exposure_ms} ms, {args.seconds} s, {os.cpu_count()} cores")
    print(f"reference  bare pymmcore-plus drain: {ref['fps']:7.1f} frames/s  pop latency p50 {ref['p50_ms']:.3f} ms  p99 {ref['p99_ms']:.3f} ms")
    print(f"scopestream daemon -> subscriber:    {ours['fps']:7.1f} frames/s  latency p50 {ours['p50_ms']:.3f} ms  p99 {ours['p99_ms']:.3f} ms  max {ours['max_ms']:.2f} ms")
    print(f"  of which acquisition -> published (in the daemon): p50 {ours['inside_p50_ms']:.3f} ms  p99 {ours['inside_p99_ms']:.3f} ms; published -> decoded by the subscriber: p99 {ours['wire_p99_ms']:.3f} ms")
    print(f"  frames received {ours['frames_received']}, processed {ours['frames_processed']}, dropped {ours['frames_dropped']}, subscriber gaps {ours['subscriber_gaps']}")
    print(f"ratios: throughput daemon/reference {ours['fps'] / ref['fps']:.3f}; p99 latency daemon/reference {ours['p99_ms'] / ref['p99_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
