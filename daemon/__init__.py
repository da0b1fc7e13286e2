"""The engine: configuration, sources, frame bus, runner, messages, publisher, control, metrics."""

from __future__ import annotations

from scopestream.daemon._config import (
    ConfigError,
    ScopestreamConfig,
    load_config,
    register_stage_plugin,
)
from scopestream.daemon._frames import Frame
from scopestream.daemon._stage import Emission, Stage, StagePlugin, installed_stage_plugins

__all__ = [
    "ConfigError",
    "Emission",
    "Frame",
    "ScopestreamConfig",
    "Stage",
    "StagePlugin",
    "installed_stage_plugins",
    "load_config",
    "register_stage_plugin",
]
