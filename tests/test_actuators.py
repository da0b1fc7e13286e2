"""Actuators through the control channel's ``act`` on real devices: the simulated camera's XY and
Z stages and frame interval, the DemoCamera's shutter; limits, bad requests, read-only mode."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("UNICORE_SEQUENCE_BUFFER_MB", "64")

from pymmcore_plus.experimental.unicore import UniMMCore  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from scopestream.daemon._actuators import ActionError, parse_action  # noqa: E402
from scopestream.daemon._config import ScopestreamConfig  # noqa: E402
from scopestream.daemon._service import Daemon  # noqa: E402
from scopestream.daemon.client import ControlClient, Subscriber  # noqa: E402
from scopestream.sim_camera import config_path  # noqa: E402
from scopestream.sim_camera.devices import simulated_device  # noqa: E402

# Stationary point particles, bright: each localization is good to ~0.02 px.
STILL = [
    "stages=[frame_stats,localize]",
    "simulation.frame_height_px=64", "simulation.frame_width_px=64", "simulation.n_particles=8",
    "simulation.particle_kind=point", "simulation.states=[Stat]", "simulation.photons_per_frame=5000",
    "acquisition.exposure_ms=5", "acquisition.frame_interval_ms=5", "metrics.enabled=false",
]


def act(ctl: ControlClient, /, **request: Any) -> dict[str, Any]:
    return ctl.request_raw(json.dumps({"command": "act", **request}).encode())


def localizations_after(sub: Subscriber, t_after: float, n: int, timeout_s: float = 10) -> list[np.ndarray]:
    """(x, y) tables of ``n`` localizations events of frames acquired after ``t_after``."""
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        m = sub.recv(0.5)
        if m is None or m.topic != "localizations" or (m.header.t_acquired or 0) <= t_after:
            continue
        out.append(np.column_stack([m.arrays["x"], m.arrays["y"]]))
    assert len(out) == n, f"only {len(out)} localizations events"
    return out


def shift_px(before: np.ndarray, after: np.ndarray, expected: tuple[float, float]) -> np.ndarray:
    """Per particle seen in both: the displacement, matched after undoing the expected shift."""
    tree = cKDTree(after - np.asarray(expected))
    d, j = tree.query(before, distance_upper_bound=1.0)
    ok = np.isfinite(d)
    return after[j[ok]] - before[ok]


def test_move_xy_moves_the_image_by_the_commanded_micrometres(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    d = Daemon(make_config(*STILL))
    daemons.append(d)
    assert d.events_endpoint and d.control_endpoint
    sub = Subscriber(d.events_endpoint, ["localizations"])
    d.start()
    assert sub.wait_ready()
    client = ControlClient(d.control_endpoint)
    before = localizations_after(sub, 0.0, 1)[0]
    # +1.2 µm in x, -0.5 µm in y at 100 nm/px: the content moves by (-12, +5) px.
    reply = act(client, action="move_xy", x_um=1.2, y_um=-0.5)
    assert reply["ok"], reply
    assert reply["state"]["x_um"] == pytest.approx(1.2) and reply["state"]["y_um"] == pytest.approx(-0.5)
    # A frame is rendered one period before it is delivered: skip two periods after t_done.
    after = localizations_after(sub, reply["t_done"] + 0.010, 1)[0]
    shifts = shift_px(before, after, (-12.0, 5.0))
    assert len(shifts) >= 3  # 8 particles, some leave the 64 px field
    # Stationary particles, ~0.02 px precision each: every shift is exact to 0.1 px (5 sigma).
    assert np.allclose(shifts, [-12.0, 5.0], atol=0.1), shifts
    # Absolute move back: the particles return.
    reply = act(client, action="move_xy", x_um=0.0, y_um=0.0, relative=False)
    assert reply["ok"], reply
    back = localizations_after(sub, reply["t_done"] + 0.010, 1)[0]
    assert np.allclose(shift_px(before, back, (0.0, 0.0)), 0.0, atol=0.1)
    sub.close()
    client.close()


def _sigma_px(image: np.ndarray, x: float, y: float, offset_adu: float, r: int = 6) -> float:
    """Second-moment PSF sigma of an isolated spot on a zero background."""
    cx, cy = int(round(x)), int(round(y))
    patch = image[cy - r: cy + r + 1, cx - r: cx + r + 1].astype(np.float64) - offset_adu
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    w = patch  # no background, no read noise: the pixels hold the spot's photons only
    mx, my = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    var = (w * ((xx - mx) ** 2 + (yy - my) ** 2)).sum() / w.sum() / 2.0
    return float(math.sqrt(var))


def test_focus_stage_defocus_widens_the_psf_as_the_optics_say() -> None:
    """sigma(dz) = sigma0 sqrt(1 + (dz / z_R)^2); pixel integration adds 1/12 px^2 to the variance."""
    core = UniMMCore()
    core.loadSystemConfiguration(str(config_path("simulated-widefield")))
    try:
        settings = {"simulation": {"frame_height_px": 64, "frame_width_px": 64, "n_particles": 1, "margin_nm": 0.0,
                                   "particle_kind": "point", "states": ["Stat"], "photons_per_frame": 200000.0,
                                   "background_photons_per_px": 0.0}, "camera": {"read_noise_e": 0.0}}
        core.setProperty("Camera", "SimulationJSON", json.dumps(settings))
        camera = simulated_device(core)
        sigma0 = camera.simulator._sigma_px
        z_r_um = camera.simulator.physics.psf_rayleigh_nm / 1000.0
        assert core.getFocusDevice() == "Z"
        core.snapImage()
        (_, truth), = camera.pop_truth()  # centre the particle with the XY stage (+1 µm moves it -10 px)
        core.setXYPosition((truth["x"][0] - 31.5) * 0.1, (truth["y"][0] - 31.5) * 0.1)
        for dz_um in (0.0, 0.2, 0.5):
            core.setPosition(dz_um)
            assert core.getPosition() == pytest.approx(dz_um)
            core.snapImage()
            image = core.getImage()
            (_, truth), = camera.pop_truth()
            assert abs(truth["x"][0] - 31.5) < 0.01 and abs(truth["y"][0] - 31.5) < 0.01
            measured = _sigma_px(image, truth["x"][0], truth["y"][0], 100.0, r=12)  # > 5 sigma
            expected = math.sqrt(sigma0**2 * (1 + (dz_um / z_r_um) ** 2) + 1 / 12)
            # 200k photons: the moment estimate is good to well under 3 %; sigma is tabulated in 2 % steps.
            assert measured == pytest.approx(expected, rel=0.04), (dz_um, measured, expected)
    finally:
        core.unloadAllDevices()


def test_move_z_set_interval_mark_and_mda_through_act(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    # Two move_z back to back: one control round trip apart, which can be well under 1 ms, so
    # the rate limit (not this test's subject) is set far above any round trip's rate.
    d = Daemon(make_config(*STILL, "limits.move_z.max_rate_hz=100000"))
    daemons.append(d)
    assert d.events_endpoint and d.control_endpoint
    sub = Subscriber(d.events_endpoint, ["frame_stats"])
    action_sub = Subscriber(d.events_endpoint, ["action"])
    d.start()
    assert sub.wait_ready() and action_sub.wait_ready()
    client = ControlClient(d.control_endpoint)
    reply = act(client, action="move_z", z_um=0.3)
    assert reply["ok"] and reply["state"]["z_um"] == pytest.approx(0.3)
    reply = act(client, action="move_z", z_um=-0.1)  # relative by default
    assert reply["ok"] and reply["state"]["z_um"] == pytest.approx(0.2), reply
    # The frame-rate switch: 5 ms -> 20 ms between frames.
    reply = act(client, action="set_interval", frame_interval_ms=20.0)
    assert reply["ok"] and reply["state"]["frame_interval_ms"] == 20.0
    t_switch = reply["t_done"]
    stamps = []
    deadline = time.monotonic() + 10
    while len(stamps) < 12 and time.monotonic() < deadline:
        m = sub.recv(0.5)
        if m is not None and m.topic == "frame_stats" and (m.header.t_acquired or 0) > t_switch + 0.05:
            stamps.append(m.header.t_acquired)
    # The camera paces on absolute deadlines: the median spacing is the period to ~1 ms.
    assert np.median(np.diff(stamps)) == pytest.approx(0.020, abs=0.002)
    reply = act(client, action="set_exposure", exposure_ms=8.0)
    assert reply["ok"] and reply["state"]["exposure_ms"] == 8.0
    reply = act(client, action="mark", text="drug added", client="notebook")
    assert reply["ok"] and reply["state"] == {"text": "drug added"}
    received = d.status().frames_received
    reply = act(client, action="run_mda", sequence={"time_plan": {"interval": 0, "loops": 4}})
    assert reply["ok"], reply
    assert reply["state"]["frames_delivered"] == 4
    time.sleep(0.3)  # continuous acquisition resumed: frames keep coming
    assert d.status().frames_received >= received + 4 + 5
    # Every action is on the stream, with who asked.
    actions = []
    deadline = time.monotonic() + 5
    while len(actions) < 6 and time.monotonic() < deadline:
        m = action_sub.recv(0.5)
        if m is not None:
            actions.append(m.body)
    assert [a["action"] for a in actions] == ["move_z", "move_z", "set_interval", "set_exposure", "mark", "run_mda"]
    assert actions[4]["requested_by"] == "notebook" and actions[4]["origin"] == "client"
    assert all(a["ok"] and a["t_done"] >= a["t_called"] >= a["t_matched"] for a in actions)
    action_sub.close()
    sub.close()
    client.close()


def test_limits_refuse_naming_the_limit(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    d = Daemon(make_config(*STILL, "limits.move_xy.max_step_um=5", "limits.move_z.travel_um=[-1,1]",
                           "limits.set_exposure.max_ms=50", "limits.move_xy.max_rate_hz=2"))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    client = ControlClient(d.control_endpoint)
    reply = act(client, action="move_xy", x_um=4.0, y_um=4.0)  # 5.66 µm > 5
    assert not reply["ok"] and "limits.move_xy.max_step_um" in reply["error"]
    reply = act(client, action="move_xy", x_um=10_000.0, y_um=0.0, relative=False)
    assert not reply["ok"] and "max_step_um" in reply["error"]
    reply = act(client, action="move_z", z_um=1.5)
    assert not reply["ok"] and "limits.move_z.travel_um" in reply["error"]
    reply = act(client, action="set_exposure", exposure_ms=100.0)
    assert not reply["ok"] and "limits.set_exposure.max_ms" in reply["error"]
    assert act(client, action="move_xy", x_um=1.0, y_um=0.0)["ok"]
    reply = act(client, action="move_xy", x_um=1.0, y_um=0.0)  # within 0.5 s of the last
    assert not reply["ok"] and "limits.move_xy.max_rate_hz" in reply["error"]
    client.close()


def test_default_travel_box_is_the_stages_own(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    d = Daemon(make_config(*STILL, "limits.move_xy.max_step_um=100000", "limits.move_xy.max_rate_hz=1000"))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    client = ControlClient(d.control_endpoint)
    reply = act(client, action="move_xy", x_um=9_999.0, y_um=0.0, relative=False)  # the simulated stage: ±10 mm
    assert reply["ok"], reply
    reply = act(client, action="move_xy", x_um=10_001.0, y_um=0.0, relative=False)
    assert not reply["ok"] and "stage's own travel" in reply["error"] and "10000" in reply["error"]
    client.close()


def test_bad_act_requests_are_answered_and_the_daemon_keeps_running(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    d = Daemon(make_config(*STILL))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    client = ControlClient(d.control_endpoint)
    cases = [
        (b'{"command": "act", "action": "teleport"}', "unknown action 'teleport'"),
        (b'{"command": "act"}', "unknown action None"),
        (b'{"command": "act", "action": "move_xy", "x_um": "1", "y_um": 0}', "x_um"),
        (b'{"command": "act", "action": "move_xy", "x_um": NaN, "y_um": 0}', "finite"),
        (b'{"command": "act", "action": "move_xy", "x_um": 1}', "y_um: required"),
        (b'{"command": "act", "action": "move_xy", "x_um": 1, "y_um": 0, "speed": 3}', "speed: unknown parameter"),
        (b'{"command": "act", "action": "shutter", "open": "yes"}', "open"),
        (b'{"command": "act", "action": "set_exposure", "exposure_ms": -1}', "exposure_ms"),
        (b'{"command": "act", "action": "move_xy", "x_um": 1e9, "y_um": 0}', "limits.move_xy.max_step_um"),
        (b'{"command": "act", "action": "run_mda", "sequence": {"time_plan": 3}}', "sequence"),
        (b'{"command": "act", "action": "mark", "text": "x", "client": 5}', "'client'"),
        (b'{"command": "act", "action": "mark", "text": "x", "trigger": {"seq": -1}}', "trigger.seq"),
    ]
    for raw, expected in cases:
        reply = client.request_raw(raw)
        assert reply["ok"] is False and expected in reply["error"], (raw, reply)
    assert client.status()["state"] == "running"
    client.close()


def test_parse_action_names_each_problem() -> None:
    assert parse_action({"action": "move_xy", "x_um": 1, "y_um": 2.5}).relative is True
    with pytest.raises(ActionError, match=r"x_um: Input should be a finite number \(given inf\)"):
        parse_action({"action": "move_xy", "x_um": float("inf"), "y_um": 0})
    with pytest.raises(ActionError, match="relative"):
        parse_action({"action": "move_z", "z_um": 1, "relative": "no"})
    with pytest.raises(ActionError, match="stage_positions"):
        parse_action({"action": "run_mda", "sequence": {"stage_positions": [[0, 0, 0]]}})


def test_missing_actuators_say_so(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon], tmp_path: Any) -> None:
    import tifffile

    movie = tmp_path / "m.tif"
    tifffile.imwrite(movie, np.zeros((50, 16, 16), dtype=np.uint16))
    d = Daemon(make_config("stages=[frame_stats]", "source.kind=file", f"source.file_path={movie}",
                           "source.replay_fps=20", "metrics.enabled=false"))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    client = ControlClient(d.control_endpoint)
    reply = act(client, action="move_xy", x_um=1.0, y_um=0.0)
    assert not reply["ok"] and "move_xy" in reply["error"] and "no such actuator" in reply["error"]
    assert act(client, action="mark", text="still fine")["ok"]
    client.close()


def test_democamera_shutter_and_missing_frame_interval(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    pytest.importorskip("mm_test_adapters")
    d = Daemon(make_config("source.mm_config=demo", "stages=[frame_stats]", "acquisition.exposure_ms=5",
                           "acquisition.frame_interval_ms=5", "metrics.enabled=false", "limits.shutter.max_rate_hz=100000"))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    client = ControlClient(d.control_endpoint)
    reply = act(client, action="shutter", open=True)
    assert reply["ok"] and reply["state"]["open"] is True
    reply = act(client, action="shutter", open=False)
    assert reply["ok"] and reply["state"]["open"] is False, reply
    reply = act(client, action="set_interval", frame_interval_ms=20.0)
    assert not reply["ok"] and "no frame-interval control" in reply["error"]
    reply = act(client, action="move_xy", x_um=3.0, y_um=-2.0)  # DXYStage through pymmcore-plus
    assert reply["ok"] and reply["state"]["x_um"] == pytest.approx(3.0, abs=0.1)
    reply = act(client, action="move_z", z_um=1.0, relative=False)  # DStage
    assert reply["ok"] and reply["state"]["z_um"] == pytest.approx(1.0, abs=0.1)
    client.close()


def test_read_only_mode_refuses_act_and_set(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    d = Daemon(make_config(*STILL, "control.read_only=true"))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    client = ControlClient(d.control_endpoint)
    reply = act(client, action="mark", text="x")
    assert not reply["ok"] and "read-only" in reply["error"]
    reply = client.request_raw(b'{"command": "set", "key": "acquisition.exposure_ms", "value": 4}')
    assert not reply["ok"] and "read-only" in reply["error"]
    assert client.status()["state"] == "running"
    assert client.request("pause")["ok"]
    client.close()


def test_stop_always_wins(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    d = Daemon(make_config(*STILL))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    client = ControlClient(d.control_endpoint)
    assert act(client, action="pause_acquisition")["state"] == {"acquisition": "paused"}
    assert client.status()["state"] == "paused"
    assert act(client, action="resume_acquisition")["ok"]
    reply = act(client, action="stop_acquisition")
    assert reply["ok"] and reply["state"] == {"acquisition": "stopping"}
    reply = act(client, action="move_xy", x_um=1.0, y_um=0.0)
    assert not reply["ok"] and "stop always wins" in reply["error"]
    assert d.wait(10)
    client.close()


def test_rate_switch_reaches_the_diffusion_stage(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    """set_interval 5 -> 20 ms mid-run: the diffusion stage's D after the switch uses the new Δt
    (with the old one, 4x the truth). Truth: RanW, D = 0.5 µm²/s. Rolling CVE estimates from
    windows wholly after the switch: their mean must lie within 4 standard errors (plus 10 % for
    tracking and respawn effects) of the truth; a stale Δt would be off by a factor 4."""
    d_true = 0.5
    d = Daemon(make_config(
        "stages=[localize,track,diffusion]", "simulation.frame_height_px=64", "simulation.frame_width_px=64",
        "simulation.n_particles=6", "simulation.particle_kind=point", "simulation.states=[RanW]",
        f"simulation.D_um2_per_s={d_true}", "simulation.photons_per_frame=4000", "acquisition.exposure_ms=1",
        "acquisition.frame_interval_ms=5", "diffusion.method=cve", "diffusion.window_frames=30",
        "diffusion.change_points=false", "track.max_displacement_px=8", "metrics.enabled=false",
    ))
    daemons.append(d)
    assert d.events_endpoint and d.control_endpoint
    sub = Subscriber(d.events_endpoint, ["diffusion", "track"])
    d.start()
    assert sub.wait_ready()
    client = ControlClient(d.control_endpoint)
    t_frames: dict[int, float] = {}
    rows: list[tuple[int, str, float, float]] = []  # frame_start, window, D, D_err

    def collect(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            m = sub.recv(0.2)
            if m is None:
                continue
            if m.topic == "track" and m.header.frame_seq is not None:
                t_frames[m.header.frame_seq] = m.header.t_acquired or 0.0
            elif m.topic == "diffusion":
                windows = m.body["labels"]["window"]
                for fs, w, dv, de in zip(m.arrays["frame_start"], m.arrays["window"], m.arrays["D_um2_per_s"],
                                         m.arrays["D_err_um2_per_s"], strict=True):
                    rows.append((int(fs), windows[int(w)], float(dv), float(de)))

    collect(1.0)
    reply = act(client, action="set_interval", frame_interval_ms=20.0)
    assert reply["ok"], reply
    t_switch = reply["t_done"]
    collect(5.0)
    d.close()
    first_new = min(f for f, t in t_frames.items() if t >= t_switch + 0.001 + 0.001)
    after = np.array([(dv, de) for fs, w, dv, de in rows if w == "rolling" and fs >= first_new
                      and np.isfinite(dv) and np.isfinite(de) and de > 0])
    assert len(after) >= 20, len(after)
    # Rolling windows of 30 frames every 15 frames: neighbours share half their steps, so about
    # half the rows are independent; the standard error of their mean follows from their spread.
    mean = float(np.mean(after[:, 0]))
    se = float(np.std(after[:, 0], ddof=1)) / np.sqrt(len(after) / 2.0)
    assert abs(mean - d_true) <= 4 * se + 0.1 * d_true, (mean, se, len(after))
    client.close()
    sub.close()


def test_action_metrics_count_and_time_every_action(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    """Real HTTP scrape: actions counted by action / result / origin, and the latency histogram's
    counts and sums equal what the action events on the stream say."""
    import re
    import urllib.request

    rule = ("rules=[{name: note, when: {topic: frame_stats}, max_firings: 2, "
            "do: {action: mark, text: seen}}]")
    d = Daemon(make_config(*STILL, "metrics.enabled=true", "limits.move_xy.max_step_um=5",
                           "limits.move_xy.max_rate_hz=100000", rule))
    daemons.append(d)
    assert d.events_endpoint and d.control_endpoint and d.metrics_port
    actions = Subscriber(d.events_endpoint, ["action"])
    d.start()
    assert actions.wait_ready()
    client = ControlClient(d.control_endpoint)
    for _ in range(3):
        assert act(client, action="move_xy", x_um=0.1, y_um=0.0)["ok"]
    assert not act(client, action="move_xy", x_um=50.0, y_um=0.0)["ok"]  # beyond max_step_um: refused
    bodies = []
    deadline = time.monotonic() + 10
    while len(bodies) < 6 and time.monotonic() < deadline:
        m = actions.recv(0.5)
        if m is not None:
            bodies.append(m.body)
    assert len(bodies) == 6, [b["action"] for b in bodies]
    text = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m2 = re.match(r"^(scopestream_action\w+)(\{[^}]*\})? ([-+0-9.eE]+)$", line)
        if m2:
            values[m2.group(1) + (m2.group(2) or "")] = float(m2.group(3))
    assert values['scopestream_actions_total{action="move_xy",origin="client",result="done"}'] == 3
    assert values['scopestream_actions_total{action="move_xy",origin="client",result="refused"}'] == 1
    assert values['scopestream_actions_total{action="mark",origin="rule",result="done"}'] == 2
    # The rule's marks answer frame_stats events: frame acquired -> called is timed, and the
    # histogram holds exactly the latencies the action events carry.
    marks = [b for b in bodies if b["action"] == "mark"]
    key = 'scopestream_action_latency_seconds_{}{{action="mark",origin="rule",span="acquired_to_called"}}'
    assert values[key.format("count")] == 2
    assert values[key.format("sum")] == pytest.approx(sum(b["acquired_to_called_ms"] for b in marks) / 1000, rel=1e-6)
    moves = [b for b in bodies if b["action"] == "move_xy" and b["ok"]]
    key = 'scopestream_action_latency_seconds_{}{{action="move_xy",origin="client",span="called_to_done"}}'
    assert values[key.format("count")] == 3
    assert values[key.format("sum")] == pytest.approx(sum(b["actuator_ms"] for b in moves) / 1000, rel=1e-6)
    # A client move with no triggering frame has no frame -> action span.
    assert 'scopestream_action_latency_seconds_count{action="move_xy",origin="client",span="acquired_to_called"}' not in values
    client.close()
    actions.close()


def test_simulated_shutter_darkens_the_frames(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    """Shutter closed: no particle photons, so nothing to localize (8 bright stationary particles
    before: each found in every frame), and the frame's mean falls to its background level
    (open, the particles add 8 x 5000 photons over 4096 px); opened again, all 8 come back."""
    d = Daemon(make_config(*STILL, "limits.shutter.max_rate_hz=100000"))
    daemons.append(d)
    assert d.events_endpoint and d.control_endpoint
    sub = Subscriber(d.events_endpoint, ["localizations", "frame_stats"])
    d.start()
    assert sub.wait_ready()
    client = ControlClient(d.control_endpoint)

    def frames_after(t: float, n: int) -> tuple[list[int], list[float]]:
        counts: list[int] = []
        means: list[float] = []
        deadline = time.monotonic() + 10
        while (len(counts) < n or len(means) < n) and time.monotonic() < deadline:
            m = sub.recv(0.5)
            if m is None or (m.header.t_acquired or 0) <= t:
                continue
            if m.topic == "localizations" and len(counts) < n:
                counts.append(len(m.arrays["x"]))
            elif m.topic == "frame_stats" and len(means) < n:
                means.append(m.body["mean_adu"] - m.body["background_adu"])
        return counts, means

    counts_open, excess_open = frames_after(time.time() + 0.05, 10)
    assert min(counts_open) == 8, counts_open
    reply = act(client, action="shutter", open=False)
    assert reply["ok"] and reply["state"]["open"] is False, reply
    camera = simulated_device(d.runner._source._core)  # type: ignore[attr-defined]
    camera.pop_truth()
    # A frame whose exposure began after the close (exposure 5 ms before its time stamp) is dark.
    counts_shut, excess_shut = frames_after(reply["t_done"] + 0.005, 10)
    assert max(counts_shut) == 0, counts_shut
    # Open, the mean exceeds the background (a low percentile) by the particles' light; shut,
    # only by the noise's skew: well under half the open excess.
    assert np.median(excess_shut) < 0.5 * np.median(excess_open), (excess_open, excess_shut)
    truth = [t for _, t in camera.pop_truth()]
    assert len(truth) > 1 and all((t["photons"] == 0).all() for t in truth[1:])  # [0]: maybe made before the close
    reply = act(client, action="shutter", open=True)
    assert reply["ok"] and reply["state"]["open"] is True
    counts_again, _ = frames_after(reply["t_done"] + 0.005, 10)
    assert min(counts_again) == 8, counts_again
    client.close()
    sub.close()
