"""Closed-loop latency: frame acquired -> rule matched -> actuator called -> actuator done.

Runs the daemon on the simulated widefield camera (64x64 px, 5 point particles, 100 frames/s) for
``--frames`` frames per run with ``--stages track`` (``localize`` + ``track``) or ``--stages all``
(every built-in stage: frame_stats, localize, track, diffusion, musical, motion), and per frame
either an in-daemon rule (``--mode rule``) or an external Python client in its own process
(``--mode client``) that answers each ``track`` event with an XY move of 0 µm (a real stage call
through pymmcore-plus). Latencies come from the daemon's ``action`` events (they carry the
triggering frame's acquisition time). Each run prints p50 / p99 / max (the first 10 % of a run's
actions are warm-up and left out) and the daemon process's CPU time beside the wall time; then
per mode, the p99 of every run and p50 / p99 / max over all runs pooled.

    python benchmarks/bench_loop.py --runs 10 --frames 1000 --stages track --mode both
    python benchmarks/bench_loop.py --runs 10 --frames 1000 --stages all --mode both
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Any

import numpy as np

from scopestream.client import ControlClient, Subscriber
from scopestream.daemon._config import load_config
from scopestream.daemon._service import Daemon

BASE = [
    "events.endpoint=tcp://127.0.0.1:0", "control.endpoint=tcp://127.0.0.1:0", "metrics.enabled=false",
    "simulation.frame_height_px=64", "simulation.frame_width_px=64",
    "simulation.n_particles=5", "simulation.particle_kind=point", "simulation.states=[RanW]",
    "simulation.D_um2_per_s=0.1", "acquisition.exposure_ms=10", "acquisition.frame_interval_ms=10",
    "limits.move_xy.max_rate_hz=1000",
]
STAGES = {
    "track": "stages=[localize,track]",
    "all": "stages=[frame_stats,localize,track,diffusion,musical,motion]",
}
RULE = ("rules=[{name: react, when: {topic: track, condition: {any_row: {field: x, op: '>=', value: 0}}}, "
        "do: {action: move_xy, x_um: 0.0, y_um: 0.0}}]")
SPANS = ("acquired_to_matched_ms", "acquired_to_called_ms", "acquired_to_done_ms")


def client_loop(events: str, control: str, stop: Any) -> None:
    """The external client (its own process): every track event -> an XY move of 0 µm."""
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


def percentiles(v: np.ndarray) -> dict[str, float]:
    return {"p50": round(float(np.percentile(v, 50)), 2), "p99": round(float(np.percentile(v, 99)), 2),
            "max": round(float(v.max()), 2)}


def one_run(mode: str, stages: str, frames: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = load_config(None, [*BASE, STAGES[stages], f"source.frames_limit={frames}", *([RULE] if mode == "rule" else [])])
    daemon = Daemon(config)
    assert daemon.events_endpoint and daemon.control_endpoint
    sub = Subscriber(daemon.events_endpoint, ["action"])
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    client = None
    if mode == "client":  # its own process, started (imports done) before the run
        client = ctx.Process(target=client_loop, args=(daemon.events_endpoint, daemon.control_endpoint, stop), daemon=True)
        client.start()
        time.sleep(2.0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    bodies = []
    try:
        daemon.start()
        sub.wait_ready()
        while True:
            m = sub.recv(0.2)
            if m is not None:
                if m.body["ok"] and m.body["acquired_to_called_ms"] is not None:
                    bodies.append(m.body)
            elif daemon.wait(0):
                break
    finally:
        stop.set()
        if client is not None:
            client.join(5)
        sub.close()
        run_stop = daemon.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    skip = len(bodies) // 10  # warm-up
    out: dict[str, Any] = {"mode": mode, "stages": stages, "frames_processed": run_stop.frames_processed if run_stop else None,
                           "frames_dropped": run_stop.frames_dropped if run_stop else None,
                           "actions": len(bodies) - skip, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}
    values = {key: np.array([b[key] for b in bodies[skip:] if b[key] is not None]) for key in SPANS}
    for key, v in values.items():
        if v.size:
            out[key] = percentiles(v)
    return out, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--frames", type=int, default=1000, help="frames per run (100 frames/s)")
    parser.add_argument("--stages", choices=["track", "all", "both"], default="track",
                        help="track: localize + track; all: every built-in stage; both: one after the other")
    parser.add_argument("--mode", choices=["rule", "client", "both"], default="both")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for the daemon's process (default: Python's 5 ms)")
    args = parser.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, "
          f"switch interval {sys.getswitchinterval() * 1000:.2f} ms, {args.frames} frames per run")
    modes = ["rule", "client"] if args.mode == "both" else [args.mode]
    stage_sets = ["track", "all"] if args.stages == "both" else [args.stages]
    for stages in stage_sets:
        for mode in modes:
            p99: list[float] = []
            pooled: dict[str, list[np.ndarray]] = {key: [] for key in SPANS}
            for i in range(args.runs):
                r, values = one_run(mode, stages, args.frames)
                p99.append(r.get("acquired_to_called_ms", {}).get("p99", float("nan")))
                for key, v in values.items():
                    pooled[key].append(v)
                print(json.dumps({"run": i, **r}), flush=True)
            print(f"# {mode}, stages {stages}: frame acquired -> actuator called, p99 per run (ms): {p99}; "
                  f"worst run {max(p99):.2f} ms", flush=True)
            for key in SPANS:
                v = np.concatenate(pooled[key]) if pooled[key] else np.empty(0)
                if v.size:
                    print(f"#   all runs, {key}: {percentiles(v)} over {v.size} actions", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
