"""Physics simulators with exact ground truth, and the Micro-Manager Python devices built on them.

Library use::

    from scopestream.sim_camera import simulate_stack
    movie, truth = simulate_stack(config, "widefield", n_frames=100, size_px=64, n_particles=10)

Scene keys (``config.simulation``) are the fields of :class:`SimulationSettings`; the truth table's
fields are described at :data:`TRUTH_DTYPE`. The Micro-Manager devices live in
``scopestream.sim_camera.devices`` (imported on demand: it needs pymmcore-plus) and are loaded by
the configuration files that :func:`config_path` returns.

The names below are imported on first use (PEP 562): the simulators pull in ``scipy.stats``
(about half a second), which validating a configuration or building the command line should not pay.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_EXPORTS: dict[str, str] = {
    "STATE_NAMES": "scopestream.sim_camera._settings",
    "Physics": "scopestream.sim_camera._settings",
    "SimulationSettings": "scopestream.sim_camera._settings",
    "physics_from_config": "scopestream.sim_camera._settings",
    "settings_from_mapping": "scopestream.sim_camera._settings",
    "ScanningSimulator": "scopestream.sim_camera._scanning",
    "WidefieldSimulator": "scopestream.sim_camera._widefield",
    "config_path": "scopestream.sim_camera._simulate",
    "make_simulator": "scopestream.sim_camera._simulate",
    "simulate_stack": "scopestream.sim_camera._simulate",
    "TRUTH_CSV_FIELDS": "scopestream.sim_camera._truth",
    "TRUTH_DTYPE": "scopestream.sim_camera._truth",
    "truth_from_json": "scopestream.sim_camera._truth",
    "truth_to_json": "scopestream.sim_camera._truth",
    "write_truth_csv": "scopestream.sim_camera._truth",
}

__all__ = [
    "Physics",
    "STATE_NAMES",
    "ScanningSimulator",
    "SimulationSettings",
    "TRUTH_CSV_FIELDS",
    "TRUTH_DTYPE",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scopestream.sim_camera' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
