"""Closed-loop latency: frame acquired -> rule matched -> actuator called -> actuator done.

Runs the daemon on the simulated widefield camera (64x64 px, 5 point particles, 100 frames/s) with
``localize`` + ``track`` and, per frame, either an in-daemon rule (``--mode rule``) or the external
Python client (``--mode client``) that answers each ``track`` event with an XY move of 0 µm (a real
stage call through pymmcore-plus). Latencies come from the daemon's ``action`` events (they carry
the triggering frame's acquisition time). Each run reports p50 / p99 / max and the CPU time of the
process beside the wall time (the build machine is shared).

    python benchmarks/bench_loop.py --runs 10 --seconds 3 [--mode rule|client|both] [--switch-interval-ms 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import numpy as np

from scopestream.client import ControlClient, Subscriber
from scopestream.daemon._config import load_config
from scopestream.daemon._service import Daemon

BASE = [
    "events.endpoint=tcp://127.0.0.1:0", "control.endpoint=tcp://127.0.0.1:0", "metrics.enabled=false",
    "stages=[frame_stats,localize,track]", "simulation.frame_height_px=64", "simulation.frame_width_px=64",
    "simulation.n_particles=5", "simulation.particle_kind=point", "simulation.states=[RanW]",
    "simulation.D_um2_per_s=0.1", "acquisition.exposure_ms=10", "acquisition.frame_interval_ms=10",
    "limits.move_xy.max_rate_hz=1000",
]
RULE = ("rules=[{name: react, when: {topic: track, condition: {any_row: {field: x, op: '>=', value: 0}}}, "
        "do: {action: move_xy, x_um: 0.0, y_um: 0.0}}]")


def client_loop(events: str, control: str, stop: threading.Event) -> None:
    with Subscriber(events, ["track"]) as sub, ControlClient(control) as ctl:
        sub.wait_ready()
        while not stop.is_set():
            msg = sub.recv(0.2)
            if msg is None:
                continue
            trigger = {"topic": "track", "seq": msg.header.seq, "frame_seq": msg.header.frame_seq,
                       "t_acquired": msg.header.t_acquired}
            ctl.request_raw(json.dumps({"command": "act", "action": "move_xy", "x_um": 0.0, "y_um": 0.0,
                                        "client": "bench", "trigger": trigger}).encode())


def one_run(mode: str, seconds: float) -> dict[str, Any]:
    config = load_config(None, [*BASE, *([RULE] if mode == "rule" else [])])
    daemon = Daemon(config)
    assert daemon.events_endpoint and daemon.control_endpoint
    sub = Subscriber(daemon.events_endpoint, ["action"])
    stop = threading.Event()
    client = None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        daemon.start()
        sub.wait_ready()
        if mode == "client":
            client = threading.Thread(target=client_loop, args=(daemon.events_endpoint, daemon.control_endpoint, stop), daemon=True)
            client.start()
        bodies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            m = sub.recv(0.2)
            if m is not None and m.body["ok"] and m.body["acquired_to_called_ms"] is not None:
                bodies.append(m.body)
    finally:
        stop.set()
        if client is not None:
            client.join(5)
        sub.close()
        run_stop = daemon.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    skip = len(bodies) // 10  # warm-up
    out: dict[str, Any] = {"mode": mode, "actions": len(bodies) - skip, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                           "frames_dropped": run_stop.frames_dropped if run_stop else None}
    for key in ("acquired_to_matched_ms", "acquired_to_called_ms", "acquired_to_done_ms"):
        v = np.array([b[key] for b in bodies[skip:]])
        if v.size:
            out[key] = {"p50": round(float(np.percentile(v, 50)), 2), "p99": round(float(np.percentile(v, 99)), 2),
                        "max": round(float(v.max()), 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mode", choices=["rule", "client", "both"], default="both")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for the whole process (default: Python's 5 ms)")
    args = parser.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} switch interval {sys.getswitchinterval() * 1000:.2f} ms")
    modes = ["rule", "client"] if args.mode == "both" else [args.mode]
    for mode in modes:
        p99 = []
        for i in range(args.runs):
            r = one_run(mode, args.seconds)
            p99.append(r.get("acquired_to_called_ms", {}).get("p99", float("nan")))
            print(json.dumps({"run": i, **r}), flush=True)
        print(f"# {mode}: frame acquired -> actuator called, p99 per run (ms): {p99}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
