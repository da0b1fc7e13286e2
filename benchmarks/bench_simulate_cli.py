"""``scopestream simulate`` against the simulator's own frame rate, in one run.

Three measurements of the same movie (widefield, 512 x 512 px, 100 particles, 1000 frames by
default), interleaved and repeated (the best of each is kept: the machine is shared):

1. the simulator alone: ``next_frame`` into one buffer, nothing written;
2. the reference, what the command did before: the whole movie simulated in memory
   (``simulate_stack``), then one ``tifffile.imwrite`` and the truth CSV written row by row
   with the ``csv`` module;
3. :func:`scopestream.sim_camera._simulate.simulate_to_files`: the same frames streamed to a
   multi-page TIFF and the truth to CSV as they are made (what the command runs);
4. the whole command, ``scopestream simulate widefield --frames N --size 512 --particles 100``, as
   a process (start-up included), and ``scopestream --version`` for the start-up alone.

Target (issue 10): the command's writing within 1.5x of the simulator's own rate.

    OMP_NUM_THREADS=1 python benchmarks/bench_simulate_cli.py [--frames 1000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scopestream.daemon._config import load_config
from scopestream.sim_camera._simulate import make_simulator, simulate_stack, simulate_to_files
from scopestream.sim_camera._truth import TRUTH_CSV_FIELDS


def simulator_alone(n_frames: int, size_px: int, n_particles: int) -> float:
    config = load_config(None, [])
    sim = make_simulator(config, "widefield", seed=0, size_px=size_px, n_particles=n_particles)
    image = np.empty(sim.shape, dtype=np.uint16)
    t0 = time.perf_counter()
    for _ in range(n_frames):
        sim.next_frame(image)
    return time.perf_counter() - t0


def in_memory_reference(n_frames: int, size_px: int, n_particles: int, folder: Path) -> float:
    """The command before streaming: simulate everything, then write the TIFF, then the CSV
    with per-row Python formatting."""
    import tifffile

    config = load_config(None, [])
    t0 = time.perf_counter()
    movie, truth = simulate_stack(config, "widefield", n_frames, size_px=size_px, n_particles=n_particles, seed=0)
    tifffile.imwrite(folder / "ref.tif", movie, photometric="minisblack", metadata={"axes": "TYX"})
    with open(folder / "ref.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TRUTH_CSV_FIELDS)
        columns = []
        for name in TRUTH_CSV_FIELDS:
            column = truth[name]
            if column.dtype.kind == "f":
                columns.append([repr(float(v)) for v in column])
            elif column.dtype.kind == "b":
                columns.append(["True" if v else "False" for v in column])
            else:
                columns.append([str(v) for v in column.tolist()])
        writer.writerows(zip(*columns, strict=True))
    return time.perf_counter() - t0


def streamed(n_frames: int, size_px: int, n_particles: int, folder: Path) -> float:
    config = load_config(None, [])
    t0 = time.perf_counter()
    simulate_to_files(
        config, "widefield", n_frames, folder / "movie.tif", folder / "truth.csv",
        size_px=size_px, n_particles=n_particles, seed=0, metadata={"axes": "TYX"},
    )
    return time.perf_counter() - t0


def command(args: list[str]) -> float:
    exe = Path(sys.executable).with_name("scopestream")
    t0 = time.perf_counter()
    subprocess.run([str(exe), *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--particles", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = args.frames
    print(time.strftime("%Y-%m-%d %H:%M:%S"), f"load average {os.getloadavg()}; {os.cpu_count()} cores")
    best = {"alone": np.inf, "reference": np.inf, "streamed": np.inf, "command": np.inf, "startup": np.inf}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for _ in range(args.repeats):
            best["alone"] = min(best["alone"], simulator_alone(n, args.size, args.particles))
            best["reference"] = min(best["reference"], in_memory_reference(n, args.size, args.particles, folder))
            best["streamed"] = min(best["streamed"], streamed(n, args.size, args.particles, folder))
            best["command"] = min(best["command"], command([
                "simulate", "widefield", "--frames", str(n), "--size", str(args.size), "--particles",
                str(args.particles), "--out", str(folder / "cmd.tif"), "--truth", str(folder / "cmd.csv"),
            ]))
            best["startup"] = min(best["startup"], command(["--version"]))
        same = (folder / "ref.csv").read_bytes() == (folder / "truth.csv").read_bytes()
        movie_mb = (folder / "movie.tif").stat().st_size / 1e6
        truth_mb = (folder / "truth.csv").stat().st_size / 1e6
    print(f"widefield {args.size}x{args.size} px, {args.particles} particles, {n} frames "
          f"(TIFF {movie_mb:.0f} MB, truth CSV {truth_mb:.1f} MB); best of {args.repeats}")
    print(f"simulator alone:             {best['alone']:6.2f} s  {n / best['alone']:7.1f} frames/s")
    print(f"reference (in memory, then written, per-row CSV): {best['reference']:6.2f} s  "
          f"{n / best['reference']:7.1f} frames/s  ratio {best['reference'] / best['alone']:.2f}x")
    print(f"simulate_to_files (streamed):{best['streamed']:6.2f} s  {n / best['streamed']:7.1f} frames/s  "
          f"ratio to the simulator {best['streamed'] / best['alone']:.2f}x (target <= 1.5x); "
          f"truth CSV byte-identical to the reference's: {same}")
    print(f"whole command (process):     {best['command']:6.2f} s  {n / best['command']:7.1f} frames/s  "
          f"ratio {best['command'] / best['alone']:.2f}x; of it start-up (`--version`) {best['startup']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
