"""Declarative rules: validation naming rule and field, firing semantics, end to end in the daemon."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from scopestream.daemon._config import ConfigError, ScopestreamConfig, build_config
from scopestream.daemon._products import Products
from scopestream.daemon._rules import FieldOfView, RuleConfig, RuleEngine
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import Subscriber
from scopestream.plugins.diffusion import DiffusionBody
from scopestream.plugins.frame_stats import FrameStatsBody
from scopestream.plugins.track import TrackBody

RULES: TypeAdapter[list[RuleConfig]] = TypeAdapter(list[RuleConfig])


def stats(seq: int, mean: float) -> FrameStatsBody:
    return FrameStatsBody(frame_seq=seq, height_px=8, width_px=8, mean_adu=mean, max_adu=mean, min_adu=mean,
                          background_adu=mean, saturated_fraction=0.0, nonfinite_fraction=0.0)


def engine(rules: list[dict[str, Any]], ctx: FieldOfView | None = None) -> RuleEngine:
    return RuleEngine(RULES.validate_python(rules), lambda: ctx)


def test_fires_once_per_matching_event_within_cooldown_and_never_beyond_max() -> None:
    eng = engine([{"name": "bright", "when": {"topic": "frame_stats", "condition": {"field": "mean_adu", "op": ">", "value": 150}},
                   "do": {"action": "mark", "text": "bright"}, "cooldown_s": 1.0, "max_firings": 3}])
    fired = []
    for i in range(100):  # events 0.1 s apart on the rule's clock: one firing per second of matches
        f = eng.evaluate("frame_stats", stats(i, 200.0 if i % 2 else 100.0), {}, now=i * 0.1)
        fired += [i] * len(f)
    # Matches at odd i; with a 1 s cooldown the firings are i = 1, 11, 21, and then max_firings stops it.
    assert fired == [1, 11, 21]
    eng = engine([{"name": "every", "when": {"topic": "frame_stats", "condition": {"field": "mean_adu", "op": ">", "value": 150}},
                   "do": {"action": "mark", "text": "x"}}])
    counts = [len(eng.evaluate("frame_stats", stats(i, 200.0 if i % 3 == 0 else 0.0), {}, now=float(i))) for i in range(30)]
    assert counts == [1 if i % 3 == 0 else 0 for i in range(30)]  # once per matching event, never twice


def test_changed_per_key_and_initial_values() -> None:
    eng = engine([{"name": "fast", "when": {"topic": "diffusion", "condition": {"any_row": {"all": [
        {"changed": "method", "key": "particle", "to": "msd"}, {"field": "D_um2_per_s", "op": ">", "value": 1.0}]}}},
        "do": {"action": "mark", "text": "becomes msd"}}])
    methods = ["cve", "msd", "mle"]

    def event(p: int, method: str, d: float) -> tuple[DiffusionBody, dict[str, np.ndarray]]:
        # One row per message, as the stage sends it: coded columns named through `labels`.
        body = DiffusionBody(frame_seq=10, count=1, method="auto", labels={"method": methods, "window": ["rolling", "track"]})
        arrays = {"particle": np.array([p]), "D_um2_per_s": np.array([d]), "method": np.array([methods.index(method)], np.uint8),
                  "window": np.array([0], np.uint8)}
        return body, arrays

    seq = [(1, "cve", 2.0), (1, "msd", 2.0), (1, "msd", 2.0), (2, "msd", 2.0), (2, "msd", 0.5), (1, "cve", 2.0), (1, "msd", 0.5)]
    fired = [len(eng.evaluate("diffusion", *event(*b), now=float(i))) for i, b in enumerate(seq)]
    # particle 1: cve -> msd fires; msd again does not; particle 2 first seen as msd "becomes" msd;
    # back to cve and to msd again, but D 0.5 fails the comparison.
    assert fired == [0, 1, 0, 1, 0, 0, 0]
    bleach = engine([{"name": "bleached", "when": {"topic": "frame_stats", "condition": {
        "field": "mean_adu", "op": "<", "value": {"mul": [{"initial": "mean_adu"}, 0.5]}}}, "do": {"action": "stop_acquisition"}}])
    means = [1000.0 * 0.9**i for i in range(12)]  # below half the start from i = 7 (0.9^7 = 0.478)
    fired = [len(bleach.evaluate("frame_stats", stats(i, m), {}, now=float(i))) for i, m in enumerate(means)]
    assert fired.index(1) == 7


def test_row_conditions_pick_a_row_and_parameters_refer_to_it() -> None:
    ctx = FieldOfView(width_px=64, height_px=48, pixel_size_nm=100.0)
    eng = engine([{"name": "follow", "when": {"topic": "track", "condition": {"any_row": {"field": "x", "op": ">=", "value": 0}}},
                   "pick": "nearest_centre",
                   "do": {"action": "move_xy",
                          "x_um": {"mul": [{"sub": [{"field": "x"}, {"context": "centre_x_px"}]}, {"context": "pixel_size_um"}]},
                          "y_um": {"mul": [{"sub": [{"field": "y"}, {"context": "centre_y_px"}]}, {"context": "pixel_size_um"}]}}}], ctx)
    body = TrackBody(frame_seq=3, count=3, started=[], ended=[], open_tracks=3)
    arrays = {"particle": np.array([4, 7, 9]), "x": np.array([5.0, 33.5, 60.0]), "y": np.array([5.0, 20.5, 40.0])}
    (firing,) = eng.evaluate("track", body, arrays, now=0.0)
    # Particle 7 is nearest the centre (31.5, 23.5): move by (+2, -3) px = (+0.2, -0.3) µm.
    assert firing.request.x_um == pytest.approx(0.2) and firing.request.y_um == pytest.approx(-0.3)
    eng = engine([{"name": "biggest", "when": {"topic": "track", "condition": {"any_row": {"field": "x", "op": ">", "value": 10}}},
                   "pick": {"max": "y"}, "do": {"action": "mark", "text": "x"}}])
    assert eng.evaluate("track", body, arrays, now=0.0)[0].request.text == "x"
    assert eng.evaluate("track", body, {k: v[:1] for k, v in arrays.items()}, now=1.0) == []  # no row > 10


def test_rate_and_frame_stage_give_the_velocity_in_the_sample() -> None:
    """The follow rule's feed-forward, by hand: a particle moving +0.5 µm per 10 ms frame in the
    sample while the stage moves with it. In every frame the sample position is the stage where
    the frame's exposure began (moves done later are not in it) plus the offset; its rate is
    50 µm/s; the rule sends the stage to that position plus 50 µm/s x 10 ms."""
    moves: list[tuple[float, float]] = []  # (t_done, x_um): the stage log

    def stage_at(t: float) -> tuple[float, float]:
        done = [x for t_done, x in moves if t_done <= t]
        return (done[-1] if done else 0.0, 0.0)

    ctx = FieldOfView(width_px=64, height_px=64, pixel_size_nm=100.0, frame_interval_s=0.01, exposure_s=0.001,
                      stage_xy_at=stage_at)
    world_x = {"add": [{"context": "frame_stage_x_um"}, {"mul": [{"field": "x"}, {"context": "pixel_size_um"}]}]}
    eng = engine([{"name": "follow", "when": {"topic": "track", "condition": {"any_row": {"field": "x", "op": ">=", "value": 0}}},
                   "do": {"action": "move_xy", "relative": False, "y_um": 0.0,
                          "x_um": {"add": [{"context": "frame_stage_x_um"},
                                           {"mul": [{"sub": [{"field": "x"}, {"context": "centre_x_px"}]}, {"context": "pixel_size_um"}]},
                                           {"mul": [{"rate": world_x, "key": "particle"}, {"context": "frame_interval_s"}]}]}}}], ctx)
    centre = 31.5
    targets = []
    for k in range(5):
        t_acq = 100.0 + 0.01 * k
        sample_x = 3.15 + 0.5 * k  # µm; the image column is (sample - stage) / 0.1 µm
        x_px = (sample_x - stage_at(t_acq - 0.001)[0]) / 0.1
        body = TrackBody(frame_seq=k, count=1, started=[], ended=[], open_tracks=1)
        (firing,) = eng.evaluate("track", body, {"particle": np.array([7]), "x": np.array([x_px]), "y": np.array([centre])},
                                 now=float(k), t_acquired=t_acq)
        targets.append(firing.request.x_um)
        moves.append((t_acq + 0.003, firing.request.x_um))  # done 3 ms after the frame: in the next one
    # First frame: no rate yet (0); then the stage aims where the particle is one frame later.
    assert targets[0] == pytest.approx(3.15 - centre * 0.1)
    for k in range(1, 5):
        assert targets[k] == pytest.approx(3.15 + 0.5 * (k + 1) - centre * 0.1), (k, targets)


def test_rate_with_an_unknown_key_is_a_configuration_error() -> None:
    from scopestream.daemon._rules import RuleCheckError, check_rules

    rules = RULES.validate_python([{"name": "r", "when": {"topic": "track"}, "do": {
        "action": "mark", "text": "x"}}])
    check_rules(rules, {"track": TrackBody})
    bad = RULES.validate_python([{"name": "v", "when": {"topic": "track", "condition": {"any_row": {"field": "x", "op": ">=", "value": 0}}},
                                  "do": {"action": "move_xy", "x_um": {"rate": {"field": "x"}, "key": "track_id"}, "y_um": 0.0}}])
    with pytest.raises(RuleCheckError, match="track_id"):
        check_rules(bad, {"track": TrackBody})


def test_stop_rules_go_first_and_priority_orders_the_rest() -> None:
    eng = engine([
        {"name": "low", "when": {"topic": "frame_stats"}, "do": {"action": "mark", "text": "low"}},
        {"name": "high", "when": {"topic": "frame_stats"}, "do": {"action": "mark", "text": "high"}, "priority": 5},
        {"name": "stop", "when": {"topic": "frame_stats"}, "do": {"action": "stop_acquisition"}, "priority": -10},
    ])
    assert [f.rule for f in eng.evaluate("frame_stats", stats(0, 1.0), {}, now=0.0)] == ["stop", "high", "low"]


@pytest.mark.parametrize(("rule", "message"), [
    ({"name": "r", "when": {"topic": "track", "condition": {"field": "D_um2_per_s", "op": ">", "value": 1}}, "do": {"action": "mark", "text": "x"}},
     "rules[0] (r): when.condition.field: topic 'track' has no field 'D_um2_per_s'"),
    ({"name": "r", "when": {"topic": "track", "condition": {"any_row": {"field": "D", "op": ">", "value": 1}}}, "do": {"action": "mark", "text": "x"}},
     "rules[0] (r): when.condition.any_row.field: topic 'track' has no field 'D'"),
    ({"name": "r", "when": {"topic": "frame_stats"}, "do": {"action": "move_xy", "x_um": {"field": "nope"}, "y_um": 0}},
     "rules[0] (r): do.x_um: topic 'frame_stats' has no field 'nope'"),
    ({"name": "r", "when": {"topic": "nosuch"}, "do": {"action": "mark", "text": "x"}}, "when.topic: no topic 'nosuch'"),
    ({"name": "r", "when": {"topic": "musical"}, "do": {"action": "mark", "text": "x"}}, "not published by this run's stages"),
    ({"name": "r", "when": {"topic": "frame_stats"}, "do": {"action": "move_xy", "x_um": 1}}, "needs parameter(s) ['y_um']"),
    ({"name": "r", "when": {"topic": "frame_stats"}, "do": {"action": "fly"}}, "rules.0.do.action"),
    ({"name": "r", "when": {"topic": "frame_stats", "condition": {"bogus": 1}}, "do": {"action": "mark", "text": "x"}},
     "a condition is a mapping with one of the keys"),
    ({"name": "r", "when": {"topic": "frame_stats"}, "pick": "nearest_centre", "do": {"action": "mark", "text": "x"}},
     "needs a row condition"),
])
def test_rule_configuration_errors_name_the_rule_and_field(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"stages": ["frame_stats", "localize", "track"], "rules": [rule]})
    assert message in str(info.value)


def test_rules_schema_is_generated_with_the_config() -> None:
    schema = ScopestreamConfig.model_json_schema()
    assert "rules" in schema["properties"] and "RuleConfig" in schema["$defs"]
    assert "limits" in schema["properties"]


def test_rules_run_in_the_daemon_and_publish_their_actions(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    config = make_config(
        "stages=[frame_stats]", "simulation.frame_height_px=32", "simulation.frame_width_px=32",
        "simulation.n_particles=2", "acquisition.exposure_ms=5", "acquisition.frame_interval_ms=5", "metrics.enabled=false",
        'rules=[{name: tick, when: {topic: frame_stats, condition: {field: mean_adu, op: ">", value: 0}}, '
        "do: {action: mark, text: tick}, max_firings: 5, cooldown_s: 0.05}, "
        '{name: enough, when: {topic: frame_stats, condition: {field: frame_seq, op: ">=", value: 60}}, '
        "do: {action: stop_acquisition}}]",
    )
    d = Daemon(config)
    daemons.append(d)
    assert d.events_endpoint
    sub = Subscriber(d.events_endpoint, ["action", "run_stop"])
    d.start()
    assert sub.wait_ready()
    actions: list[dict[str, Any]] = []
    headers = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = sub.recv(0.5)
        if m is None:
            continue
        if m.topic == "run_stop":
            break
        actions.append(m.body)
        headers.append(m.header)
    ticks = [a for a in actions if a["requested_by"] == "tick"]
    stops = [a for a in actions if a["requested_by"] == "enough"]
    assert len(ticks) == 5  # max_firings, although every frame matches
    assert all(a["origin"] == "rule" and a["ok"] and a["trigger_topic"] == "frame_stats" for a in ticks)
    t_matched = np.array([a["t_matched"] for a in ticks])
    # Cooldown: enforced on the monotonic clock, t_matched read on the wall clock at the same
    # point; the two clocks' rates differ at most by the kernel's 500 ppm slew limit.
    assert np.all(np.diff(t_matched) >= 0.05 * (1 - 500e-6))
    # In frames: the triggering frames' acquisition times (5 ms apart, the camera's own clock) differ
    # by the matching times' difference less the change in latency (a first event handled late,
    # at start-up, brings the next match closer in frames): at least 50 ms - that change.
    latency_s = np.array([a["acquired_to_matched_ms"] for a in ticks]) / 1000.0
    gap_s = np.diff([a["trigger_seq"] for a in ticks]) * 0.005
    assert np.all(gap_s >= 0.05 * (1 - 500e-6) - np.diff(latency_s) - 1e-4), (gap_s, latency_s)
    assert len(stops) == 1 and stops[0]["ok"] and stops[0]["trigger_frame_seq"] >= 60
    assert all(a["acquired_to_called_ms"] is not None and a["acquired_to_called_ms"] >= 0 for a in ticks)
    assert headers[0].frame_seq == ticks[0]["trigger_frame_seq"]
    assert d.wait(10) and d.runner.run_stop is not None and "stop_acquisition" in d.runner.run_stop.reason
    sub.close()



def test_example_rule_configurations_are_valid() -> None:
    from pathlib import Path

    from scopestream.daemon._config import load_config

    folder = Path(__file__).resolve().parents[1] / "deploy" / "examples"
    names = ["follow_particle.yaml", "fast_imaging.yaml", "refocus.yaml", "stop_when_bleached.yaml"]
    for name in names:
        assert load_config(folder / name).rules, name


def test_sharpness_falls_with_defocus() -> None:
    """frame_stats.sharpness on the simulated widefield camera: in focus > 1 µm out of focus."""
    import json
    import os

    os.environ.setdefault("UNICORE_SEQUENCE_BUFFER_MB", "64")
    from pymmcore_plus.experimental.unicore import UniMMCore

    from scopestream.daemon._frames import Frame
    from scopestream.plugins.frame_stats import FrameStatsSettings, FrameStatsStage
    from scopestream.sim_camera import config_path

    core = UniMMCore()
    core.loadSystemConfiguration(str(config_path("simulated-widefield")))
    try:
        core.setProperty("Camera", "SimulationJSON", json.dumps({"simulation": {
            "frame_height_px": 64, "frame_width_px": 64, "n_particles": 20, "particle_kind": "point", "states": ["Stat"]}}))
        stage = FrameStatsStage(build_config({}), FrameStatsSettings(sample_stride_px=1))
        values = []
        for z in (0.0, 1.0):
            core.setPosition(z)
            core.snapImage()
            (body,) = (e.body for e in stage.process(Frame(0, core.getImage(), 0.0, None, {}), Products()))
            values.append(body.sharpness)  # type: ignore[attr-defined]
        # 20 spots of 2000 photons: in focus the squared differences are dominated by the spots
        # (hundreds of ADU between neighbours); defocused by 4.6 z_R they spread over ~4x the width.
        assert values[0] > 3 * values[1], values
    finally:
        core.unloadAllDevices()
