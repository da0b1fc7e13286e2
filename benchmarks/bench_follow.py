"""How far out following works: a sweep of RanW D and Flow speed, checked against the truth.

The daemon runs on the simulated widefield camera (one point particle, 100 nm px, 1 ms exposure)
with ``localize`` + ``track``; ``examples/follow_particle.py`` keeps the particle at the centre
with the XY stage; the simulated camera's truth says where the particle really was in every frame
(``tests/follow_harness.py``).

The physical limit. A move shows in the first frame whose exposure starts after it is done; with
a loop shorter than ``period - exposure`` that is the next frame (one frame of loop delay, the
least a camera allows). A random walker cannot be predicted, so in a frame its true offset from
the centre is the diffusion since the frame the move was computed from: per axis Gaussian with
variance s² = 2 D Δt per frame of loop delay (+ localization noise), its distance Rayleigh:
P(r > 2 px) = exp(-(2 px)² / (2 s²)). 99 % within 2 px needs s² <= 4 / (2 ln 100) = 0.434 px²,
i.e. D <= 0.434 px² / (2 Δt) per frame of delay (0.217 µm²/s at 100 nm px and 10 ms, one frame).
Directed motion is predicted (velocity feed-forward), so a Flow particle is limited by how well
its velocity is known and by the tracker and the field (lost: no longer in the field).

    python benchmarks/bench_follow.py [--frames 1000] [--d 0.05,0.1,0.2,0.3,0.5,1.0]
        [--speeds 50,100,150,200,300] [--fast]   # --fast: D = 0.5 at 4 ms frames, 32 px field

Per run: within_2px (share of frames), the measured per-axis variance against 2 D Δt, the share
of frames the loop served in time, the largest distance, CPU and wall time.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from follow_harness import run_following, scene  # noqa: E402

PX_UM = 0.1


def one(state: str, value: float, frames: int, interval_ms: float, size_px: int, exposure_ms: float) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    r = run_following(scene(state, value, interval_ms, size_px, exposure_ms), frames)
    d, off, served = r["distances_px"], r["offsets_px"], r["served"]
    finite = np.isfinite(d)
    out = {
        "state": state, "value": value, "interval_ms": interval_ms, "size_px": size_px, "frames": int(d.size),
        "within_2px": float(np.mean(d <= 2.0)), "lost_frames": int((~finite).sum()),
        "served": float(served.mean()) if served.size else float("nan"),
        "within_2px_served": float(np.mean(d[served] <= 2.0)) if served.any() else float("nan"),
        "var_px2": float(np.nanmean(off[finite] ** 2)) if finite.any() else float("nan"),
        "max_px": float(d.max()) if d.size else float("nan"),
        "dropped": r["frames_dropped"],
        "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
    }
    if state == "RanW":
        s2 = 2 * value * interval_ms / 1000.0 / PX_UM**2  # one frame of delay, px²
        out["floor_px2"] = s2
        out["predicted_within_2px"] = 1 - math.exp(-4.0 / (2 * s2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--d", default="0.05,0.1,0.2,0.3,0.5,1.0", help="RanW D values, µm²/s ('' for none)")
    parser.add_argument("--speeds", default="50,100,150,200,300", help="Flow speeds, µm/s ('' for none)")
    parser.add_argument("--fast", action="store_true", help="also D = 0.5 at 4 ms frames on a 32 px field, 0.5 ms exposure")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()[0]:.2f}, {args.frames} frames per run")
    rows = []
    for v in [float(x) for x in args.d.split(",") if x]:
        rows.append(one("RanW", v, args.frames, 10.0, 64, 1.0))
        print(rows[-1], flush=True)
    if args.fast:
        rows.append(one("RanW", 0.5, args.frames, 4.0, 32, 0.5))
        print(rows[-1], flush=True)
    for v in [float(x) for x in args.speeds.split(",") if x]:
        rows.append(one("Flow", v, args.frames, 10.0, 64, 1.0))
        print(rows[-1], flush=True)
    print()
    print("| state | D µm²/s or speed µm/s | Δt ms | field px | within 2 px | predicted (1-frame floor) | served | within 2 px when served "
          "| var px² (floor) | max px | lost frames | CPU s / wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pred = f"{r['predicted_within_2px']:.4f}" if "predicted_within_2px" in r else "-"
        floor = f" ({r['floor_px2']:.2f})" if "floor_px2" in r else ""
        print(f"| {r['state']} | {r['value']:g} | {r['interval_ms']:g} | {r['size_px']} | {r['within_2px']:.4f} | {pred} | "
              f"{r['served']:.3f} | {r['within_2px_served']:.4f} | {r['var_px2']:.3f}{floor} | {r['max_px']:.2f} | "
              f"{r['lost_frames']} | {r['cpu_s']:.1f} / {r['wall_s']:.1f} |")
    ranw = [r for r in rows if r["state"] == "RanW" and r["interval_ms"] == 10.0 and r["within_2px"] >= 0.99]
    flow = [r for r in rows if r["state"] == "Flow" and r["lost_frames"] == 0]
    print()
    print(f"largest D with >= 99 % of frames within 2 px (10 ms frames): {max((r['value'] for r in ranw), default=float('nan')):g} µm²/s "
          f"(one-frame physical limit 0.217 µm²/s)")
    print(f"largest Flow speed never lost: {max((r['value'] for r in flow), default=float('nan')):g} µm/s; "
          f"largest within 2 px in every served frame: "
          f"{max((r['value'] for r in flow if r['within_2px_served'] == 1.0), default=float('nan')):g} µm/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
