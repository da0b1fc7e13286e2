"""Physics simulators with exact ground truth, and the Micro-Manager Python devices built on them.

Library use::

    from scopestream.sim_camera import simulate_stack
    movie, truth = simulate_stack(config, "widefield", n_frames=100, size_px=64, n_particles=10)

Scene keys (``config.simulation``) are the fields of :class:`SimulationSettings`; the truth table's
fields are described at :data:`TRUTH_DTYPE`. The Micro-Manager devices live in
``scopestream.sim_camera.devices`` (imported on demand: it needs pymmcore-plus) and are loaded by
the configuration files that :func:`config_path` returns.
"""

from __future__ import annotations

from scopestream.sim_camera._scanning import ScanningSimulator
from scopestream.sim_camera._settings import (
    STATE_NAMES,
    Physics,
    SimulationSettings,
    physics_from_config,
    settings_from_mapping,
)
from scopestream.sim_camera._simulate import config_path, make_simulator, simulate_stack
from scopestream.sim_camera._truth import (
    TRUTH_CSV_FIELDS,
    TRUTH_DTYPE,
    truth_from_json,
    truth_to_json,
    write_truth_csv,
)
from scopestream.sim_camera._widefield import WidefieldSimulator

__all__ = [
    "STATE_NAMES",
    "TRUTH_CSV_FIELDS",
    "TRUTH_DTYPE",
    "Physics",
    "ScanningSimulator",
    "SimulationSettings",
    "WidefieldSimulator",
    "config_path",
    "make_simulator",
    "physics_from_config",
    "settings_from_mapping",
    "simulate_stack",
    "truth_from_json",
    "truth_to_json",
    "write_truth_csv",
]
