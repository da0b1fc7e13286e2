"""The engine: configuration, sources, frame bus, runner, messages, publisher, control, metrics."""

from __future__ import annotations

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
    Offload,
    ReportsCounters,
    RunContext,
    Stage,
    StagePlugin,
    TakesSettings,
    TearsDown,
    installed_stage_plugins,
)

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
    "TearsDown",
    "TrackUpdate",
    "TrackWindow",
    "TrackWindows",
    "installed_stage_plugins",
    "load_config",
    "register_stage_plugin",
]
