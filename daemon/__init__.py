"""The engine: configuration, sources, frame bus, runner, messages, publisher, control, metrics.

The names below are imported on first use (PEP 562), so that ``import scopestream.daemon._cli``
(the ``scopestream`` command) costs neither pydantic nor numpy before a command needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scopestream.daemon._config import (
        ConfigError,
        ScopestreamConfig,
        load_config,
        register_stage_plugin,
    )
    from scopestream.daemon._frames import Frame
    from scopestream.daemon._products import (
        MOTION_STATES,
        DiffusionEstimates,
        DiffusionUpdate,
        FrameStatistics,
        Localizations,
        MotionStates,
        MusicalImage,
        Products,
        TrackUpdate,
        TrackWindow,
        TrackWindows,
    )
    from scopestream.daemon._stage import (
        Emission,
        FollowsTiming,
        LooksAhead,
        Offload,
        ReportsCounters,
        RunContext,
        Stage,
        StagePlugin,
        TakesSettings,
        TearsDown,
        installed_stage_plugins,
        load_stage_plugin,
        stage_plugin_names,
    )

_EXPORTS: dict[str, str] = {
    "ConfigError": "scopestream.daemon._errors",
    "ScopestreamConfig": "scopestream.daemon._config",
    "load_config": "scopestream.daemon._config",
    "register_stage_plugin": "scopestream.daemon._config",
    "Frame": "scopestream.daemon._frames",
    "MOTION_STATES": "scopestream.daemon._products",
    "DiffusionEstimates": "scopestream.daemon._products",
    "DiffusionUpdate": "scopestream.daemon._products",
    "FrameStatistics": "scopestream.daemon._products",
    "Localizations": "scopestream.daemon._products",
    "MotionStates": "scopestream.daemon._products",
    "MusicalImage": "scopestream.daemon._products",
    "Products": "scopestream.daemon._products",
    "TrackUpdate": "scopestream.daemon._products",
    "TrackWindow": "scopestream.daemon._products",
    "TrackWindows": "scopestream.daemon._products",
    "Emission": "scopestream.daemon._stage",
    "Offload": "scopestream.daemon._stage",
    "ReportsCounters": "scopestream.daemon._stage",
    "RunContext": "scopestream.daemon._stage",
    "Stage": "scopestream.daemon._stage",
    "StagePlugin": "scopestream.daemon._stage",
    "TakesSettings": "scopestream.daemon._stage",
    "FollowsTiming": "scopestream.daemon._stage",
    "LooksAhead": "scopestream.daemon._stage",
    "TearsDown": "scopestream.daemon._stage",
    "installed_stage_plugins": "scopestream.daemon._stage",
    "load_stage_plugin": "scopestream.daemon._stage",
    "stage_plugin_names": "scopestream.daemon._stage",
}

__all__ = [
    "MOTION_STATES",
    "ConfigError",
    "DiffusionEstimates",
    "DiffusionUpdate",
    "Emission",
    "Frame",
    "FrameStatistics",
    "Localizations",
    "MotionStates",
    "MusicalImage",
    "Offload",
    "Products",
    "ReportsCounters",
    "RunContext",
    "ScopestreamConfig",
    "Stage",
    "StagePlugin",
    "TakesSettings",
    "FollowsTiming",
    "LooksAhead",
    "TearsDown",
    "TrackUpdate",
    "TrackWindow",
    "TrackWindows",
    "installed_stage_plugins",
    "load_config",
    "load_stage_plugin",
    "register_stage_plugin",
    "stage_plugin_names",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scopestream.daemon' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
