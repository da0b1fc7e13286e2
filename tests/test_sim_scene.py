"""Scene physics of the simulators: motion states, state switching, photophysics, entering/leaving.

Each test states the statistic it checks and derives its tolerance from the sampling error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import chisquare

from scopestream.daemon._config import build_config
from scopestream.sim_camera import make_simulator, physics_from_config, simulate_stack
from scopestream.sim_camera._scene import Scene


def _scene(seed: int = 0, z_diffusion: bool = False, **simulation: Any) -> Scene:
    physics = physics_from_config(build_config({"simulation": simulation}))
    return Scene(physics, np.random.default_rng(seed), z_diffusion=z_diffusion)


def test_random_walk_gives_back_D_from_the_msd() -> None:
    scene = _scene(n_particles=400, margin_nm=0, states=["RanW"], D_um2_per_s=0.5)
    dt_ms, steps = 10.0, 50
    path = scene.advance(np.full(steps, dt_ms))  # (400, 50, 3)
    disp = np.diff(path[:, :, :2], axis=1)  # independent Gaussian steps, variance 2 D dt per axis
    d_hat_nm2_per_ms = np.mean(disp**2) / (2 * dt_ms)
    n = disp.size  # 400 * 49 * 2 independent squared steps: relative SE sqrt(2/n) = 0.5 %
    assert abs(d_hat_nm2_per_ms / 500.0 - 1) < 5 * math.sqrt(2 / n)
    assert np.all(path[:, :, 2] == 0)  # 2-D unless z diffusion is asked for


def test_random_walk_is_3d_when_asked() -> None:
    scene = _scene(n_particles=400, margin_nm=0, states=["RanW"], D_um2_per_s=0.5, z_diffusion=True)
    path = scene.advance(np.full(20, 10.0))
    dz = np.diff(path[:, :, 2], axis=1)
    assert abs(np.mean(dz**2) / (2 * 500.0 * 10.0) - 1) < 5 * math.sqrt(2 / dz.size)


def test_truth_positions_give_back_D_with_short_exposure() -> None:
    # With a 0.05 ms exposure (one sub-step) the truth is the instantaneous position, so the
    # per-axis MSD of truth positions over one 10 ms frame is 2 D dt with no blur bias.
    config = build_config(
        {
            "acquisition": {"exposure_ms": 0.05, "frame_interval_ms": 10},
            "simulation": {"states": ["RanW"], "D_um2_per_s": 0.3, "margin_nm": 5000,
                           "particle_kind": "point", "substeps_per_exposure": 1},
        }
    )
    _, truth = simulate_stack(config, "widefield", 40, size_px=64, n_particles=100, seed=2)
    truth = truth[np.lexsort((truth["frame"], truth["particle"]))]
    same = truth["particle"][1:] == truth["particle"][:-1]
    dx = np.diff(truth["x"])[same] * 100.0  # px -> nm
    dy = np.diff(truth["y"])[same] * 100.0
    d_hat = np.mean(np.concatenate([dx, dy]) ** 2) / (2 * 10.0) / 1000.0  # um^2/s
    n = 2 * dx.size
    assert abs(d_hat / 0.3 - 1) < 5 * math.sqrt(2 / n)
    assert np.allclose(truth["D_um2_per_s"], 0.3)


def test_confined_walk_stays_inside_its_circle_and_fills_it() -> None:
    scene = _scene(n_particles=2000, margin_nm=0, states=["RCir"], D_um2_per_s=2.0, rcir_radius_nm=300.0)
    anchor = scene.anchor_nm.copy()
    path = scene.advance(np.full(100, 10.0))  # 1 s >> R^2 / D = 45 ms: equilibrium
    r = np.hypot(path[:, :, 0] - anchor[:, None, 0], path[:, :, 1] - anchor[:, None, 1])
    assert r.max() <= 300.0 + 1e-9
    # Uniform in the disk: E[r^2] = R^2/2, Var[r^2] = R^4/12. Every 5th step from step 50 on
    # (50 ms apart, four relaxation times R^2 / (1.84^2 D) = 13 ms: nearly independent) of 2000
    # particles: 20000 samples, SE = R^2 / sqrt(12 * 20000) = 0.002 R^2. 5 SE = 0.01 R^2, tight
    # enough to catch reflection in too coarse chunks (SD R/4 gives E[r^2] = 0.4875 R^2).
    r2 = r[:, 50::5] ** 2 / 300.0**2
    assert abs(np.mean(r2) - 0.5) < 5 / math.sqrt(12 * r2.size)


def test_confined_steps_longer_than_the_relaxation_time_end_uniform_and_independent() -> None:
    # 200 ms steps, R = 300 nm, D >= 2 um^2/s > 3 R^2 / 200 ms = 1.35 um^2/s: every step relaxes
    # and ends at a uniform point of the disk, whatever its start (a walk folded in one chunk
    # would pile points up near the centre).
    scene = _scene(n_particles=2000, margin_nm=0, states=["RCir"], D_um2_per_s=(2.0, 4.0), rcir_radius_nm=300.0)
    anchor = scene.anchor_nm.copy()
    path = scene.advance(np.full(10, 200.0))
    rel = path[:, :, :2] - anchor[:, None, :]
    r2 = (rel**2).sum(axis=2).ravel() / 300.0**2
    assert r2.max() <= 1.0 + 1e-12
    # Uniform in the disk: E[r^2] = R^2/2, SD of r^2 = R^2/sqrt(12); every step an independent draw.
    assert abs(r2.mean() - 0.5) < 5 / math.sqrt(12 * r2.size)
    # Independent of where the step began: lag-1 correlation of x, SE 1/sqrt(pairs).
    x = rel[:, :, 0]
    corr = np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]
    assert abs(corr) < 5 / math.sqrt(x[:, 1:].size)


def test_circular_motion_keeps_radius_and_speed() -> None:
    scene = _scene(n_particles=50, margin_nm=0, states=["Circ"], circ_radius_nm=300.0, circ_speed_um_per_s=5.0)
    anchor = scene.anchor_nm.copy()
    dt = 2.0
    path = scene.advance(np.full(100, dt))
    r = np.hypot(path[:, :, 0] - anchor[:, None, 0], path[:, :, 1] - anchor[:, None, 1])
    assert np.allclose(r, 300.0)
    chord = np.hypot(*np.diff(path[:, :, :2], axis=1).transpose(2, 0, 1))
    # 5 um/s = 5 nm/ms along the arc; the chord of an arc s on radius R is 2 R sin(s / 2R).
    assert np.allclose(chord, 2 * 300.0 * np.sin(5.0 * dt / 600.0))


def test_flow_moves_at_its_speed_along_a_smooth_curve() -> None:
    scene = _scene(n_particles=300, margin_nm=0, states=["Flow"], flow_speed_um_per_s=20.0,
                   flow_persistence_length_um=2.0)
    heading0 = scene.heading_rad.copy()
    dt = 1.0
    path = scene.advance(np.full(200, dt))
    step = np.hypot(*np.diff(path[:, :, :2], axis=1).transpose(2, 0, 1))
    assert np.allclose(step, 20.0 * dt)  # 20 nm per ms
    # Heading after 200 steps: a random walk with variance path_length / persistence length
    # = 4000 nm / 2000 nm = 2 rad^2; estimate from the mean resultant cos of the turn,
    # E[cos dtheta] = exp(-var/2) = 0.368, SE <= sqrt(0.5/300) = 0.041. 5 SE.
    turn = scene.heading_rad - heading0
    assert abs(np.mean(np.cos(turn)) - math.exp(-1.0)) < 5 * math.sqrt(0.5 / 300)


def test_state_dwell_times_match_the_switching_rates() -> None:
    dwell = {"Stat": 50.0, "RanW": 200.0, "RCir": 100.0, "Circ": 100.0, "Flow": 100.0}
    scene = _scene(n_particles=300, margin_nm=0, dwell_ms=dwell)
    frame_ms, frames = 10.0, 600
    states = np.empty((frames, len(scene.state)), dtype=np.int8)
    for i in range(frames):
        states[i] = scene.state
        scene.switch_states(frame_ms)
    before, after = states[:-1].ravel(), states[1:].ravel()
    left = before != after
    for code, name in enumerate(["Stat", "RanW", "RCir", "Circ", "Flow"]):
        trials = before == code
        p_expected = 1 - math.exp(-frame_ms / dwell[name])
        n = trials.sum()
        # Binomial: SE = sqrt(p (1 - p) / n). 5 SE.
        assert abs(left[trials].mean() - p_expected) < 5 * math.sqrt(p_expected * (1 - p_expected) / n)
    # The next state is uniform among the four others.
    moves = np.bincount(after[left & (before == 0)], minlength=5)[1:]
    assert chisquare(moves).pvalue > 1e-4


def test_a_track_changes_state_mid_way() -> None:
    config = build_config({"simulation": {"dwell_ms": 50.0}})
    _, truth = simulate_stack(config, "widefield", 30, size_px=32, n_particles=5, seed=4)
    changes = [len(set(truth["state"][truth["particle"] == p])) for p in np.unique(truth["particle"])]
    assert max(changes) >= 2


def test_blinking_duty_cycle_and_switching_rate_match() -> None:
    on_ms, off_ms, dt = 30.0, 10.0, 5.0
    scene = _scene(n_particles=100, margin_nm=0, fluorophores_per_vesicle=10,
                   blink_on_mean_ms=on_ms, blink_off_mean_ms=off_ms)
    on = scene.photophysics(np.full(2000, dt))  # (100, 10, 2000)
    duty = on_ms / (on_ms + off_ms)
    # Correlation time tau = 1 / (1/30 + 1/10) = 7.5 ms: about 1000 fluorophores * 10 s / (2 tau)
    # = 6.7e5 independent samples; SE = sqrt(duty (1 - duty) / 6.7e5) = 5.3e-4. 5 SE.
    assert abs(on.mean() - duty) < 5 * math.sqrt(duty * (1 - duty) / 6.7e5)
    # Two-state chain: P(on at t + dt | on at t) = duty + (1 - duty) exp(-dt / tau).
    tau = 1 / (1 / on_ms + 1 / off_ms)
    stay = duty + (1 - duty) * math.exp(-dt / tau)
    prev, nxt = on[:, :, :-1], on[:, :, 1:]
    n = prev.sum()
    assert abs((prev & nxt).sum() / n - stay) < 5 * math.sqrt(stay * (1 - stay) / n) * 2  # x2: correlated pairs


def test_bleaching_half_life_matches() -> None:
    scene = _scene(n_particles=500, margin_nm=0, fluorophores_per_vesicle=10, bleach_half_life_ms=100.0)
    on = scene.photophysics(np.full(30, 10.0))  # no blinking: on until bleached
    surviving = on.mean(axis=(0, 1))
    t = 10.0 * np.arange(1, 31)
    expected = 0.5 ** (t / 100.0)
    n = on.shape[0] * on.shape[1]  # 5000 independent fluorophores; binomial SE at each time
    assert np.all(np.abs(surviving - expected) < 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12)
    # Half-life from the time the surviving fraction crosses 1/2: 100 ms within one step.
    assert abs(t[np.argmin(np.abs(surviving - 0.5))] - 100.0) <= 10.0


def test_particles_enter_and_leave_at_constant_density() -> None:
    config = build_config(
        {"simulation": {"states": ["Flow"], "flow_speed_um_per_s": 20.0, "margin_nm": 500,
                        "particle_kind": "point"}}
    )
    sim = make_simulator(config, "widefield", size_px=32, n_particles=20, seed=5)
    first_ids = set(sim.scene.particle_id.tolist())
    visible = []
    ids = set()
    for _ in range(300):
        _, truth = sim.next_frame()
        visible.append(truth["visible"].sum())
        ids |= set(truth["particle"][truth["visible"]].tolist())
    assert len(ids - first_ids) > 20  # new particles came in
    # Visible count ~ Poisson(20) (SD 4.5) with ~16-frame correlation (3.2 um at 20 um/s):
    # ~19 independent values over 300 frames, SE ~ 1.0. 5 SE.
    assert abs(np.mean(visible) - 20) < 5.0
