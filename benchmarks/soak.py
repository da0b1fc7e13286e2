"""Soak test: the embedded default daemon at the camera's rate for a long time, RSS sampled.

Runs ``scopestream run`` with no configuration (the simulated widefield camera, every stage on)
in this process, on free local ports, for ``--minutes`` (default 60). Every ``--sample-s``
seconds it samples the resident set size of this process and of its child processes (the
off-thread workers) from ``/proc`` and the frame counts; at the end it prints

- RSS growth, MB/hour, from a least-squares line through the samples after ``--warmup-s``
  (the bus, the camera's sequence buffer and the workers fill up during the warm-up);
- frames received / processed / dropped (by reason), the processed rate against the camera's;
- whether received = processed + dropped holds in ``run_stop`` (exit 1 if not);
- CPU time (process_time) beside wall time.

    python benchmarks/soak.py [--minutes 60] [--sample-s 5] [--warmup-s 120] [--set KEY=VALUE ...]

:func:`soak` is importable (the tests run a 15 s version on a small camera).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("UNICORE_SEQUENCE_BUFFER_MB", "256")

LOCAL = ["events.endpoint=tcp://127.0.0.1:0", "control.endpoint=tcp://127.0.0.1:0", "metrics.port=0"]


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process, MB (VmRSS from /proc; 0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def children_rss_mb() -> float:
    """RSS of this process's direct children (worker processes), MB."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(rss_mb(pid) for pid in pids)
    return total


@dataclass
class SoakResult:
    duration_s: float
    cpu_s: float
    camera_rate_hz: float
    frames_received: int
    frames_processed: int
    frames_dropped: int
    frames_dropped_by_reason: dict[str, int]
    counts_add_up: bool
    exit_status: str
    rss_start_mb: float
    rss_end_mb: float
    rss_growth_mb_per_hour: float
    children_rss_end_mb: float
    children_growth_mb_per_hour: float
    samples: list[tuple[float, float, float, int, int, int]] = field(default_factory=list)


def _slope_per_hour(t_s: np.ndarray, y: np.ndarray) -> float:
    if len(t_s) < 3 or np.ptp(t_s) <= 0:
        return float("nan")
    return float(np.polyfit(t_s, y, 1)[0] * 3600.0)


def soak(seconds: float, overrides: list[str] = (), sample_s: float = 5.0, warmup_s: float = 120.0,  # type: ignore[assignment]
         progress: bool = False) -> SoakResult:
    """Run the embedded default (plus ``overrides``) for ``seconds``; sample RSS and counts."""
    from scopestream.daemon._config import load_config
    from scopestream.daemon._service import Daemon

    config = load_config(None, [*LOCAL, *overrides])
    camera_rate_hz = 1000.0 / max(config.acquisition.frame_interval_ms, config.acquisition.exposure_ms)
    daemon = Daemon(config)
    samples: list[tuple[float, float, float, int, int, int]] = []
    cpu0 = time.process_time()
    t0 = time.monotonic()
    rss0 = rss_mb()
    try:
        daemon.start()
        next_sample = t0
        while (now := time.monotonic()) - t0 < seconds:
            if now >= next_sample:
                st = daemon.status()
                samples.append((now - t0, rss_mb(), children_rss_mb(), st.frames_received,
                                st.frames_processed, st.frames_dropped))
                if progress:
                    s = samples[-1]
                    print(f"  t={s[0]:7.1f} s  RSS {s[1]:7.1f} MB  children {s[2]:7.1f} MB  "
                          f"received {s[3]}  processed {s[4]}  dropped {s[5]}", flush=True)
                next_sample += sample_s
            time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
    finally:
        stop = daemon.close()
    duration_s = time.monotonic() - t0
    cpu_s = time.process_time() - cpu0
    arr = np.array(samples, dtype=float)
    after = arr[arr[:, 0] >= warmup_s] if len(arr) else arr
    assert stop is not None, "no run_stop"
    return SoakResult(
        duration_s=duration_s,
        cpu_s=cpu_s,
        camera_rate_hz=camera_rate_hz,
        frames_received=stop.frames_received,
        frames_processed=stop.frames_processed,
        frames_dropped=stop.frames_dropped,
        frames_dropped_by_reason=dict(stop.frames_dropped_by_reason),
        counts_add_up=stop.frames_received == stop.frames_processed + stop.frames_dropped
        and stop.frames_dropped == sum(stop.frames_dropped_by_reason.values()),
        exit_status=stop.exit_status,
        rss_start_mb=rss0,
        rss_end_mb=float(arr[-1, 1]) if len(arr) else rss_mb(),
        rss_growth_mb_per_hour=_slope_per_hour(after[:, 0], after[:, 1]) if len(after) else float("nan"),
        children_rss_end_mb=float(arr[-1, 2]) if len(arr) else 0.0,
        children_growth_mb_per_hour=_slope_per_hour(after[:, 0], after[:, 2]) if len(after) else float("nan"),
        samples=samples,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to run (default 60)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warmup-s", type=float, default=None, help="samples before this are left out of the fit (default: min(120, 20 %% of the run))")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="also write the result (with samples) here")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60.0
    warmup_s = args.warmup_s if args.warmup_s is not None else min(120.0, 0.2 * seconds)
    print(f"soak: embedded default for {seconds:.0f} s, RSS every {args.sample_s:g} s, fit after {warmup_s:.0f} s "
          f"({time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs)", flush=True)
    r = soak(seconds, args.overrides, args.sample_s, warmup_s, progress=True)
    print(f"-- wall {r.duration_s:.1f} s, CPU (process_time, all threads) {r.cpu_s:.1f} s ({r.cpu_s / r.duration_s:.2f} cores)")
    print(f"-- frames received {r.frames_received}, processed {r.frames_processed}, dropped {r.frames_dropped} "
          f"{r.frames_dropped_by_reason} ({100.0 * r.frames_dropped / max(1, r.frames_received):.1f} %)")
    print(f"-- processed {r.frames_processed / r.duration_s:.1f} frames/s = "
          f"{r.frames_processed / r.duration_s / r.camera_rate_hz:.3f} x the camera's {r.camera_rate_hz:g} frames/s")
    print(f"-- RSS {r.rss_start_mb:.1f} MB at start, {r.rss_end_mb:.1f} MB at the end; "
          f"growth after warm-up {r.rss_growth_mb_per_hour:+.1f} MB/hour")
    print(f"-- worker processes RSS {r.children_rss_end_mb:.1f} MB at the end; growth {r.children_growth_mb_per_hour:+.1f} MB/hour")
    print(f"-- run_stop exit_status {r.exit_status!r}; received = processed + dropped: {r.counts_add_up}")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(r), indent=1))
    return 0 if r.counts_add_up else 1


if __name__ == "__main__":
    sys.exit(main())
