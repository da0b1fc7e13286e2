"""Library entry points: whole simulated stacks, and the shipped Micro-Manager configurations."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scopestream.daemon._config import ConfigError, ScopestreamConfig
from scopestream.sim_camera._scanning import ScanningSimulator
from scopestream.sim_camera._settings import physics_from_config
from scopestream.sim_camera._truth import TruthCsvWriter, concatenate_truth
from scopestream.sim_camera._widefield import WidefieldSimulator

SimulatorKind = Literal["widefield", "scanning"]

_CONFIG_FILES = {
    "simulated-widefield": "simulated_widefield.cfg",
    "simulated-scanning": "simulated_scanning.cfg",
}


def make_simulator(
    config: ScopestreamConfig,
    kind: str,
    *,
    seed: int = 0,
    size_px: int | None = None,
    n_particles: int | None = None,
) -> WidefieldSimulator | ScanningSimulator:
    """A frame-by-frame simulator of ``kind`` ('widefield' or 'scanning') built from ``config``.

    ``size_px`` (square frames) and ``n_particles`` override ``config.simulation``.

    Raises
    ------
    ConfigError
        For an unknown kind or invalid settings (the message names the key).
    """
    overrides: dict[str, int] = {}
    if size_px is not None:
        overrides["frame_height_px"] = overrides["frame_width_px"] = size_px
    if n_particles is not None:
        overrides["n_particles"] = n_particles
    physics = physics_from_config(config, **overrides)
    if kind == "widefield":
        return WidefieldSimulator(physics, seed)
    if kind == "scanning":
        return ScanningSimulator(physics, seed)
    raise ConfigError(f"unknown simulator kind {kind!r}; choose 'widefield' or 'scanning'")


def simulate_stack(
    config: ScopestreamConfig,
    kind: SimulatorKind,
    n_frames: int,
    size_px: int = 64,
    n_particles: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a movie and its exact ground truth.

    Parameters
    ----------
    config
        Optics, camera noise model, acquisition timing and ``config.simulation`` (scene keys of
        :class:`SimulationSettings`).
    kind
        'widefield' or 'scanning'.
    n_frames
        Frames to simulate (>= 1).
    size_px
        Frame height and width, px.
    n_particles
        Particles in the field of view at the start (more live unseen in the margin around it).
    seed
        Random seed; the same seed gives the same movie and truth.

    Returns
    -------
    movie : (n_frames, size_px, size_px) uint16
        ADU, with the camera offset, gain and noise of ``config.camera``.
    truth : structured array
        One row per frame and particle, fields of ``TRUTH_DTYPE`` (frame, particle, x, y, state,
        D_um2_per_s, photons, z, visible, t_ms, speed_um_per_s). Rows with ``visible`` False are
        particles outside the image.

    Raises
    ------
    ConfigError
        Invalid settings or arguments; the message names them.
    """
    simulator = _stack_simulator(config, kind, n_frames, size_px, n_particles, seed)
    movie = np.empty((n_frames, size_px, size_px), dtype=np.uint16)
    truths = []
    for i in range(n_frames):
        _, truth = simulator.next_frame(movie[i])
        truths.append(truth)
    return movie, concatenate_truth(truths)


def _stack_simulator(
    config: ScopestreamConfig, kind: str, n_frames: int, size_px: int, n_particles: int, seed: int
) -> WidefieldSimulator | ScanningSimulator:
    if not isinstance(n_frames, int | np.integer) or n_frames < 1:
        raise ConfigError(f"n_frames must be a positive integer, got {n_frames!r}")
    if not isinstance(size_px, int | np.integer) or not 4 <= size_px <= 8192:
        raise ConfigError(f"size_px must be an integer in [4, 8192], got {size_px!r}")
    if not isinstance(n_particles, int | np.integer) or n_particles < 0:
        raise ConfigError(f"n_particles must be a non-negative integer, got {n_particles!r}")
    return make_simulator(config, kind, seed=seed, size_px=int(size_px), n_particles=int(n_particles))


def simulate_to_files(
    config: ScopestreamConfig,
    kind: SimulatorKind,
    n_frames: int,
    movie_path: str | Path,
    truth_path: str | Path,
    size_px: int = 64,
    n_particles: int = 10,
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
    truth_rows_per_write: int = 20_000,
) -> None:
    """Simulate a movie and write it (multi-page TIFF) and its truth (CSV) as it is made.

    The same frames and truth as :func:`simulate_stack` with the same arguments, but only one
    frame and a block of truth rows are in memory at a time: each frame goes to the TIFF as a
    page when it is simulated, the truth rows to the CSV every ``truth_rows_per_write`` rows.

    Parameters
    ----------
    config, kind, n_frames, size_px, n_particles, seed
        As for :func:`simulate_stack`.
    movie_path
        The TIFF file: ``n_frames`` uint16 pages, tifffile's shaped metadata (``metadata`` plus
        the shape); BigTIFF when the movie exceeds 4 GB.
    truth_path
        The CSV file (see :func:`scopestream.sim_camera.write_truth_csv`).
    metadata
        JSON-able metadata stored with the movie (e.g. ``{"axes": "TYX", ...}``).

    Raises
    ------
    ConfigError
        Invalid settings or arguments; the message names them.
    OSError
        An output cannot be written.
    """
    import tifffile

    simulator = _stack_simulator(config, kind, n_frames, size_px, n_particles, seed)
    with TruthCsvWriter(truth_path) as truth_out:

        def frames() -> Iterator[np.ndarray]:
            # tifffile writes each page before it asks for the next: one buffer serves all.
            image = np.empty(simulator.shape, dtype=np.uint16)
            pending: list[np.ndarray] = []
            rows = 0
            for _ in range(n_frames):
                _, truth = simulator.next_frame(image)
                pending.append(truth)
                rows += truth.size
                if rows >= truth_rows_per_write:
                    truth_out.write(concatenate_truth(pending))
                    pending, rows = [], 0
                yield image
            truth_out.write(concatenate_truth(pending))

        tifffile.imwrite(
            movie_path, frames(), shape=(n_frames, *simulator.shape), dtype=np.uint16,
            photometric="minisblack", metadata=dict(metadata or {}),
        )


def config_path(name: str) -> Path:
    """The Micro-Manager configuration file shipped for a simulated camera.

    Parameters
    ----------
    name
        'simulated-widefield' or 'simulated-scanning'.

    Raises
    ------
    ConfigError
        For any other name.
    """
    try:
        filename = _CONFIG_FILES[name]
    except KeyError:
        raise ConfigError(
            f"no simulated camera named {name!r}; choose one of {sorted(_CONFIG_FILES)}"
        ) from None
    return Path(__file__).with_name(filename)
