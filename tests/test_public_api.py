"""Defects of issue 10 mended with public means: the tracker takes new settings through its own
method, the frozen configuration gets its stage sections by validation (no write to pydantic's
private fields), and the simulated camera is found through Micro-Manager's property API."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from scopestream.daemon._config import ScopestreamConfig, build_config, config_with
from scopestream.plugins.localize import LocalizeSettings
from scopestream.plugins.track import Tracker, TrackSettings

PACKAGE = Path(__file__).resolve().parent.parent


def _two_frames(tracker: Tracker, step_px: float) -> tuple[int, int]:
    """One particle seen at x=10, then ``step_px`` further; the ids it gets in both frames."""
    first = tracker.update(0, np.array([10.0]), np.array([10.0]))
    second = tracker.update(1, np.array([10.0 + step_px]), np.array([10.0]))
    return int(first.particle[0]), int(second.particle[0])


def test_tracker_apply_settings_widens_the_gate_and_keeps_open_tracks() -> None:
    # max_displacement 1 px: a 6 px step is far outside the gate (a new track starts);
    # after apply_settings(8 px) the same step links, and the open track keeps its id.
    narrow = Tracker(TrackSettings(max_displacement_px=1.0))
    a, b = _two_frames(narrow, 6.0)
    assert a != b
    tracker = Tracker(TrackSettings(max_displacement_px=1.0))
    tracker.update(0, np.array([10.0]), np.array([10.0]))
    tracker.apply_settings(TrackSettings(max_displacement_px=8.0))
    assert tracker.settings.max_displacement_px == 8.0 and tracker.open_tracks == 1
    upd = tracker.update(1, np.array([16.0]), np.array([10.0]))
    assert list(upd.particle) == [0] and not upd.started
    # Same result as a tracker built with the wide settings from the start.
    assert _two_frames(Tracker(TrackSettings(max_displacement_px=8.0)), 6.0) == (0, 0)


def test_config_stage_sections_are_validated_models_of_a_frozen_config() -> None:
    config = build_config({"localize": {"threshold_snr": 7}})
    section = config.stage_settings("localize")
    assert isinstance(section, LocalizeSettings) and section.threshold_snr == 7
    assert isinstance(config.model_extra, dict) and set(config.model_extra) >= {"track", "diffusion", "musical"}
    with pytest.raises(Exception, match="frozen"):
        config.stages = []  # type: ignore[misc]
    # Rebuilt configurations and copies keep validated sections.
    changed = config_with(config, "track.max_gap_frames", 4)
    assert changed.stage_settings("track").max_gap_frames == 4  # type: ignore[attr-defined]
    assert changed.stage_settings("localize").threshold_snr == 7  # type: ignore[attr-defined]
    assert ScopestreamConfig.model_validate(config) is config
    with pytest.raises(KeyError, match="no settings section 'nope'"):
        config.stage_settings("nope")


PRIVATE_WRITES = ("__pydantic_extra__", "_pydevices")


def test_no_private_fields_of_libraries_or_other_objects_are_touched() -> None:
    """The package reads no pymmcore-plus private manager and writes no pydantic private field,
    and a stage does not assign to another object's private attributes."""
    offenders = []
    for path in PACKAGE.glob("*/*.py"):
        if path.parts[-2] in ("tests", "benchmarks") or ".venv" in str(path):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "_pydevices":
                offenders.append(f"{path.name}:{node.lineno} reads _pydevices")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "__setattr__":
                if any(isinstance(a, ast.Constant) and a.value in PRIVATE_WRITES for a in node.args):
                    offenders.append(f"{path.name}:{node.lineno} writes a private pydantic field")
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for sub in ast.walk(t):
                        # self._x._y = ...: writing a private attribute of another object
                        if (isinstance(sub, ast.Attribute) and sub.attr.startswith("_") and not sub.attr.startswith("__")
                                and isinstance(sub.value, ast.Attribute) and sub.value.attr.startswith("_")
                                and isinstance(sub.value.value, ast.Name) and sub.value.value.id == "self"):
                            offenders.append(f"{path.name}:{node.lineno} writes self.{sub.value.attr}.{sub.attr}")
    assert not offenders, offenders
