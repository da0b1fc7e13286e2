"""Particles in continuous time: motion states, Markov switching, photophysics, entering and leaving.

The scene lives in world coordinates (nanometres; x to the right, y down, z along the optical
axis, 0 in focus). The camera's field of view is a rectangle whose top-left corner is the
stage position; particles exist in a band of ``margin_nm`` around it. A particle that leaves
the band is replaced by a new particle (new id) at the position wrapped to the opposite side,
so the density stays constant and particles enter and leave the field of view.

Time is in milliseconds. :meth:`Scene.advance` moves particles through a sequence of steps of
any length (exact Gaussian increments for Brownian motion, so a long step has the same law as
many short ones); the cameras call it with the times at which they sample the scene.

Motion states (Sekh et al.): ``Stat`` (still), ``RanW`` (Brownian, D), ``RCir`` (Brownian with
D reflected inside a circle of radius 200-400 nm around where the state began), ``Circ``
(uniform motion around a circle of radius 200-500 nm that passes through where the state began),
``Flow`` (constant speed along a smooth random curve: the heading performs a random walk whose
variance grows by path length / persistence length). States switch at frame boundaries, so every
frame of the ground truth has one state per particle.

Photophysics per fluorophore: a three-state Markov chain on -> off (blinking), off -> on,
on -> bleached (bleaching only from the on state), propagated with the exact transition matrix
``expm(Q dt)`` for any step ``dt``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import expm

from scopestream.sim_camera._settings import STATE_NAMES, Physics, range_bounds

STAT, RANW, RCIR, CIRC, FLOW = range(5)
UM2_PER_S_TO_NM2_PER_MS = 1000.0
_ON, _OFF, _BLEACHED = 0, 1, 2


def _fold_into_circle(rel_nm: np.ndarray, radius_nm: np.ndarray) -> np.ndarray:
    """Reflect points ``rel_nm`` (..., 2), relative to a circle's centre, radially back inside it.

    A point at distance ``r > R`` goes to ``2R - r`` (clipped at the centre) on the same ray.
    ``radius_nm`` broadcasts against ``rel_nm[..., 0]``.
    """
    r = np.hypot(rel_nm[..., 0], rel_nm[..., 1])
    scale = np.where(r > radius_nm, np.clip(2.0 * radius_nm - r, 0.0, None) / np.maximum(r, 1e-12), 1.0)
    return rel_nm * scale[..., None]


class Scene:
    """All particles of one simulation, as parallel arrays (one row per particle slot).

    Parameters
    ----------
    physics
        Validated settings.
    rng
        The simulation's random generator (the scene draws from it in a fixed order).
    z_diffusion
        Brownian states diffuse along z too.
    origin_nm
        World position of the top-left corner of the field of view (the stage position), nm.

    Attributes
    ----------
    particle_id : (N,) int64
        Ground-truth id of the particle in each slot (a replaced particle gets a new id).
    pos_nm : (N, 3) float64
        Centre of each particle (x, y, z), world nm.
    state : (N,) int8
        Motion state code (index into ``STATE_NAMES``).
    fluor_offset_nm : (N, F, 3) float64
        Fluorophore positions relative to the particle centre.
    fluor_state : (N, F) int8
        0 on, 1 off, 2 bleached.
    photons_per_frame : (N,) float64
        Expected photons per frame of each particle with all fluorophores on.
    time_ms : float
        Scene time.
    """

    def __init__(
        self,
        physics: Physics,
        rng: np.random.Generator,
        *,
        z_diffusion: bool,
        origin_nm: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self._phys = physics
        sim = physics.sim
        self._sim = sim
        self._rng = rng
        self._z_diffusion = z_diffusion
        self.origin_nm = (float(origin_nm[0]), float(origin_nm[1]))
        self.time_ms = 0.0
        self.n_fluorophores = sim.fluorophores_per_vesicle if sim.particle_kind == "vesicle" else 1
        self._allowed = np.sort(np.array([STATE_NAMES.index(s) for s in sim.states], dtype=np.int8))
        self._dwell_ms = np.array([sim.dwell_ms_for(s) for s in STATE_NAMES], dtype=np.float64)

        fov_w = sim.frame_width_px * physics.pixel_size_nm
        fov_h = sim.frame_height_px * physics.pixel_size_nm
        self.fov_size_nm = (fov_w, fov_h)
        box_w, box_h = fov_w + 2 * sim.margin_nm, fov_h + 2 * sim.margin_nm
        n_margin = round(sim.n_particles * (box_w * box_h / (fov_w * fov_h) - 1.0))
        n_total = sim.n_particles + n_margin
        f = self.n_fluorophores

        self.particle_id = np.zeros(n_total, dtype=np.int64)
        self.pos_nm = np.zeros((n_total, 3))
        self.state = np.zeros(n_total, dtype=np.int8)
        self.diameter_nm = np.zeros(n_total)
        self.photons_per_frame = np.zeros(n_total)
        self.D_nm2_per_ms = np.zeros(n_total)
        self.anchor_nm = np.zeros((n_total, 2))
        self.radius_nm = np.zeros(n_total)
        self.phase_rad = np.zeros(n_total)
        self.omega_rad_per_ms = np.zeros(n_total)
        self.heading_rad = np.zeros(n_total)
        self.speed_nm_per_ms = np.zeros(n_total)
        self.fluor_offset_nm = np.zeros((n_total, f, 3))
        self.fluor_state = np.zeros((n_total, f), dtype=np.int8)
        self._next_id = 0

        # Exactly n_particles inside the field of view, the rest uniformly in the margin band.
        xy = np.empty((n_total, 2))
        xy[: sim.n_particles, 0] = rng.uniform(0, fov_w, sim.n_particles)
        xy[: sim.n_particles, 1] = rng.uniform(0, fov_h, sim.n_particles)
        xy[sim.n_particles :] = self._uniform_in_band(n_margin)
        xy += np.asarray(self.origin_nm)
        self._spawn(np.arange(n_total), xy)

        # Photophysics generator Q (rows: from on/off/bleached), per ms.
        k_off = 1.0 / sim.blink_on_mean_ms if sim.blink_off_mean_ms > 0 else 0.0
        k_on = 1.0 / sim.blink_off_mean_ms if sim.blink_off_mean_ms > 0 else 0.0
        k_bleach = math.log(2.0) / sim.bleach_half_life_ms if sim.bleach_half_life_ms else 0.0
        self._photophysics_static = k_off == 0.0 and k_bleach == 0.0
        self._q = np.array(
            [[-(k_off + k_bleach), k_off, k_bleach], [k_on, -k_on, 0.0], [0.0, 0.0, 0.0]]
        )
        self._transition_cache: dict[float, np.ndarray] = {}

    # -- creation --------------------------------------------------------------------------

    def _uniform_in_band(self, n: int) -> np.ndarray:
        """``n`` points uniform in the margin band around the field of view (FOV corner at 0)."""
        m = self._sim.margin_nm
        fov_w, fov_h = self.fov_size_nm
        out = np.empty((n, 2))
        filled = 0
        while filled < n:  # rejection sampling in the box; the band is a sizeable fraction of it
            k = max(2 * (n - filled), 16)
            cand = np.column_stack(
                [self._rng.uniform(-m, fov_w + m, k), self._rng.uniform(-m, fov_h + m, k)]
            )
            inside = (cand[:, 0] >= 0) & (cand[:, 0] < fov_w) & (cand[:, 1] >= 0) & (cand[:, 1] < fov_h)
            cand = cand[~inside][: n - filled]
            out[filled : filled + len(cand)] = cand
            filled += len(cand)
        return out

    def _draw(self, value: float | tuple[float, float], n: int) -> np.ndarray:
        low, high = range_bounds(value)
        if low == high:
            return np.full(n, low)
        return self._rng.uniform(low, high, n)

    def _spawn(self, idx: np.ndarray, xy_nm: np.ndarray) -> None:
        """New particles (new ids) in slots ``idx`` at world positions ``xy_nm``."""
        sim, rng, n = self._sim, self._rng, len(idx)
        if n == 0:
            return
        self.particle_id[idx] = np.arange(self._next_id, self._next_id + n)
        self._next_id += n
        self.pos_nm[idx, :2] = xy_nm
        self.pos_nm[idx, 2] = self._draw(sim.z_start_nm, n)
        self.photons_per_frame[idx] = self._draw(sim.photons_per_frame, n)
        self.D_nm2_per_ms[idx] = self._draw(sim.D_um2_per_s, n) * UM2_PER_S_TO_NM2_PER_MS
        f = self.n_fluorophores
        if sim.particle_kind == "vesicle":
            d = self._draw(sim.vesicle_diameter_nm, n)
            self.diameter_nm[idx] = d
            # Uniform in a ball: isotropic direction, radius ~ R * U^(1/3).
            direction = rng.standard_normal((n, f, 3))
            direction /= np.linalg.norm(direction, axis=2, keepdims=True)
            r = 0.5 * d[:, None] * rng.random((n, f)) ** (1.0 / 3.0)
            self.fluor_offset_nm[idx] = direction * r[:, :, None]
        else:
            self.diameter_nm[idx] = 0.0
            self.fluor_offset_nm[idx] = 0.0
        if sim.blink_off_mean_ms > 0:
            # Start in the stationary distribution of the blinking chain.
            p_on = sim.blink_on_mean_ms / (sim.blink_on_mean_ms + sim.blink_off_mean_ms)
            self.fluor_state[idx] = np.where(rng.random((n, f)) < p_on, _ON, _OFF)
        else:
            self.fluor_state[idx] = _ON
        codes = self._allowed[rng.integers(0, len(self._allowed), n)]
        self._enter_state(idx, codes)

    def _enter_state(self, idx: np.ndarray, codes: np.ndarray) -> None:
        """Put particles ``idx`` into states ``codes``, drawing the state's parameters."""
        sim, rng = self._sim, self._rng
        self.state[idx] = codes
        for code in (RCIR, CIRC, FLOW):
            sel = idx[codes == code]
            n = len(sel)
            if n == 0:
                continue
            if code == RCIR:
                self.radius_nm[sel] = self._draw(sim.rcir_radius_nm, n)
                self.anchor_nm[sel] = self.pos_nm[sel, :2]
            elif code == CIRC:
                radius = self._draw(sim.circ_radius_nm, n)
                phase = rng.uniform(0, 2 * np.pi, n)
                speed = self._draw(sim.circ_speed_um_per_s, n)  # µm/s == nm/ms
                sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
                self.radius_nm[sel] = radius
                self.phase_rad[sel] = phase
                self.speed_nm_per_ms[sel] = speed
                self.omega_rad_per_ms[sel] = sign * speed / radius
                self.anchor_nm[sel] = self.pos_nm[sel, :2] - radius[:, None] * np.column_stack(
                    [np.cos(phase), np.sin(phase)]
                )
            else:
                self.heading_rad[sel] = rng.uniform(0, 2 * np.pi, n)
                self.speed_nm_per_ms[sel] = self._draw(sim.flow_speed_um_per_s, n)

    # -- motion ----------------------------------------------------------------------------

    def advance(self, dts_ms: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """Move particles through consecutive steps and return the positions after each.

        Parameters
        ----------
        dts_ms
            Step durations, ms: shape (K,) for every selected particle alike, or (n, K) per
            particle. Zero-length steps are allowed.
        idx
            Particle slots to move (default all). Only these advance; the caller keeps the
            others in step (``time_ms`` is not changed here).

        Returns
        -------
        (n, K, 3) float64
            Centre positions after each step, world nm.
        """
        sel = np.arange(len(self.state)) if idx is None else np.asarray(idx)
        n = len(sel)
        dts = np.asarray(dts_ms, dtype=np.float64)
        k = dts.shape[-1]
        dts = np.broadcast_to(dts, (n, k))
        path = np.repeat(self.pos_nm[sel][:, None, :], k, axis=1)
        codes = self.state[sel]
        for code, mover in (
            (RANW, self._move_ranw),
            (RCIR, self._move_rcir),
            (CIRC, self._move_circ),
            (FLOW, self._move_flow),
        ):
            m = np.flatnonzero(codes == code)
            if m.size:
                path[m] = mover(sel[m], dts[m], path[m])
        self.pos_nm[sel] = path[:, -1]
        return path

    def _brownian_steps(self, idx: np.ndarray, dts: np.ndarray, dims: int) -> np.ndarray:
        sd = np.sqrt(2.0 * self.D_nm2_per_ms[idx][:, None] * dts)
        return self._rng.standard_normal((len(idx), dts.shape[1], dims)) * sd[:, :, None]

    def _move_ranw(self, idx: np.ndarray, dts: np.ndarray, path: np.ndarray) -> np.ndarray:
        dims = 3 if self._z_diffusion else 2
        path[:, :, :dims] += np.cumsum(self._brownian_steps(idx, dts, dims), axis=1)
        return path

    def _move_rcir(self, idx: np.ndarray, dts: np.ndarray, path: np.ndarray) -> np.ndarray:
        """Brownian motion reflected at the circle.

        The free Brownian path is folded back radially where it crosses the circle (the reflection
        principle: exact at a straight wall; the wall's curvature matters to order (SD / R)²
        for a stretch of path with per-axis SD ``SD``). Paths that stay short against the radius
        over all their steps (total per-axis SD at most R / 4: the sub-steps of a frame, the lines
        and dwell windows of a scan) are folded in one vectorized pass. Longer paths are stepped
        in sequence, each step cut into chunks with a per-axis SD of at most R / 8 (the chunk
        count is the largest any particle needs; each particle uses its own chunk length), each
        chunk folded like a short path (chunks of R / 4 measurably shrink the stationary
        distribution, which must be uniform in the disk: E[r²] = 0.4875 R² instead of 0.5; at
        R / 8 it is 0.4985 R²). A step longer than 3 R²/D (ten times the slowest
        relaxation time R² / (1.84² D) of the disk) ends uniformly distributed in the disk,
        independent of where it began, and is drawn so.
        """
        anchor = self.anchor_nm[idx]
        radius = self.radius_nm[idx]
        d = self.D_nm2_per_ms[idx]
        short = 2.0 * d * dts.sum(axis=1) <= (radius / 4.0) ** 2
        if short.any():
            s = np.flatnonzero(short)
            steps = self._brownian_steps(idx[s], dts[s], 2)
            rel = path[s, :, :2] - anchor[s, None, :] + np.cumsum(steps, axis=1)
            path[s, :, :2] = anchor[s, None, :] + _fold_into_circle(rel, radius[s, None])
        if not short.all():
            s = np.flatnonzero(~short)
            path[s, :, :2] = self._reflect_stepwise(anchor[s], radius[s], d[s], dts[s], path[s, 0, :2])
        if self._z_diffusion:
            path[:, :, 2] += np.cumsum(self._brownian_steps(idx, dts, 1)[:, :, 0], axis=1)
        return path

    def _reflect_stepwise(
        self, anchor: np.ndarray, radius: np.ndarray, d: np.ndarray, dts: np.ndarray, start: np.ndarray
    ) -> np.ndarray:
        rng = self._rng
        n, k = dts.shape
        var = 2.0 * d[:, None] * dts  # (n, K) per-axis variance of each free step
        relaxed = d[:, None] * dts > 3.0 * (radius**2)[:, None]
        need = np.where(relaxed, 0.0, var / ((radius / 8.0) ** 2)[:, None])
        n_chunk = np.ceil(np.max(need, axis=0, initial=1.0)).astype(np.intp)  # (K,) common to all
        # All chunks of all steps in one draw. The walk runs on x + iy (one complex number per
        # particle): a chunk is then one addition, one |.| and one comparison; the fold is
        # _fold_into_circle's, inline.
        sd = np.sqrt(var / n_chunk).T  # (K, n) per-axis SD of one chunk
        increments = (
            rng.standard_normal((int(n_chunk.sum()), n, 2)).view(np.complex128)[:, :, 0]
            * np.repeat(sd, n_chunk, axis=0)
        )
        step_end = (np.cumsum(n_chunk) - 1).tolist()
        relaxed_any = relaxed.any(axis=0).tolist()
        two_radius = 2.0 * radius
        out_rel = np.empty((n, k, 2))
        rel_xy = start - anchor
        rel = rel_xy.view(np.complex128)[:, 0]  # a view: changes show in rel_xy
        j = 0
        for c, inc in enumerate(increments):
            rel += inc
            r = np.abs(rel)
            crossed = r > radius
            if np.count_nonzero(crossed):  # most chunks leave every particle inside
                rel *= np.where(crossed, np.maximum(two_radius - r, 0.0) / np.maximum(r, 1e-12), 1.0)
            if c == step_end[j]:
                if relaxed_any[j]:
                    m = relaxed[:, j]
                    rho = radius[m] * np.sqrt(rng.random(int(m.sum())))
                    ang = rng.uniform(0, 2 * np.pi, len(rho))
                    rel_xy[m] = np.column_stack([rho * np.cos(ang), rho * np.sin(ang)])
                out_rel[:, j] = rel_xy
                j += 1
        return anchor[:, None, :] + out_rel

    def _move_circ(self, idx: np.ndarray, dts: np.ndarray, path: np.ndarray) -> np.ndarray:
        phase = self.phase_rad[idx][:, None] + self.omega_rad_per_ms[idx][:, None] * np.cumsum(dts, axis=1)
        radius = self.radius_nm[idx][:, None]
        path[:, :, 0] = self.anchor_nm[idx, 0][:, None] + radius * np.cos(phase)
        path[:, :, 1] = self.anchor_nm[idx, 1][:, None] + radius * np.sin(phase)
        self.phase_rad[idx] = np.mod(phase[:, -1], 2 * np.pi)
        return path

    def _move_flow(self, idx: np.ndarray, dts: np.ndarray, path: np.ndarray) -> np.ndarray:
        speed = self.speed_nm_per_ms[idx][:, None]
        length = speed * dts
        persistence_nm = self._sim.flow_persistence_length_um * 1000.0
        turns = self._rng.standard_normal(dts.shape) * np.sqrt(length / persistence_nm)
        heading = self.heading_rad[idx][:, None] + np.cumsum(turns, axis=1)
        previous = np.concatenate([self.heading_rad[idx][:, None], heading[:, :-1]], axis=1)
        mid = 0.5 * (previous + heading)  # chord of a smoothly turning path
        path[:, :, 0] += np.cumsum(length * np.cos(mid), axis=1)
        path[:, :, 1] += np.cumsum(length * np.sin(mid), axis=1)
        self.heading_rad[idx] = np.mod(heading[:, -1], 2 * np.pi)
        return path

    # -- photophysics ----------------------------------------------------------------------

    def _transition(self, dt_ms: float) -> np.ndarray:
        """Cumulative rows of the exact transition matrix over ``dt_ms``."""
        key = round(float(dt_ms), 9)
        cum = self._transition_cache.get(key)
        if cum is None:
            p = expm(self._q * max(key, 0.0))
            p = np.clip(p, 0.0, None)
            p /= p.sum(axis=1, keepdims=True)
            cum = np.cumsum(p, axis=1)
            if len(self._transition_cache) > 256:
                self._transition_cache.clear()
            self._transition_cache[key] = cum
        return cum

    def photophysics(self, dts_ms: np.ndarray) -> np.ndarray:
        """Evolve every fluorophore through the steps; return which are on after each.

        Returns
        -------
        (N, F, K) bool
            On-state of each fluorophore at the end of each step.
        """
        dts = np.atleast_1d(np.asarray(dts_ms, dtype=np.float64))
        n, f = self.fluor_state.shape
        out = np.empty((n, f, len(dts)), dtype=bool)
        if self._photophysics_static:
            out[:] = (self.fluor_state == _ON)[:, :, None]
            return out
        state = self.fluor_state
        for j, dt in enumerate(dts):
            cum = self._transition(float(dt))[state]  # (N, F, 3)
            u = self._rng.random((n, f))
            state = ((u >= cum[:, :, 0]).astype(np.int8) + (u >= cum[:, :, 1])).astype(np.int8)
            out[:, :, j] = state == _ON
        self.fluor_state = state
        return out

    # -- frame-boundary events -------------------------------------------------------------

    def switch_states(self, frame_ms: float) -> None:
        """At a frame boundary, each particle leaves its state with probability 1 - exp(-T/dwell)."""
        if len(self._allowed) < 2 or len(self.state) == 0:
            return
        dwell = self._dwell_ms[self.state]
        p_leave = -np.expm1(-frame_ms / dwell)
        leave = np.flatnonzero(self._rng.random(len(self.state)) < p_leave)
        if leave.size == 0:
            return
        allowed = self._allowed  # sorted
        where = np.searchsorted(allowed, self.state[leave])
        # Draw uniformly among the other allowed states: skip the current one.
        r = self._rng.integers(0, len(allowed) - 1, leave.size)
        r = r + (r >= where)
        self._enter_state(leave, allowed[r])

    def respawn_outside(self) -> None:
        """Replace particles that left the band around the field of view by new ones.

        The new particle enters at the position wrapped to the opposite side of the band.
        """
        m = self._sim.margin_nm
        ox, oy = self.origin_nm
        fov_w, fov_h = self.fov_size_nm
        lo = np.array([ox - m, oy - m])
        size = np.array([fov_w + 2 * m, fov_h + 2 * m])
        rel = self.pos_nm[:, :2] - lo
        out = np.flatnonzero(((rel < 0) | (rel >= size)).any(axis=1))
        if out.size:
            self._spawn(out, lo + np.mod(rel[out], size))

    # -- truth helpers ---------------------------------------------------------------------

    def state_names(self) -> np.ndarray:
        """State name of every particle (U4)."""
        return np.asarray(STATE_NAMES, dtype="U4")[self.state]

    def truth_D_um2_per_s(self) -> np.ndarray:
        """D of diffusing particles (RanW, RCir), 0 for the others, µm²/s."""
        diffusing = (self.state == RANW) | (self.state == RCIR)
        return np.where(diffusing, self.D_nm2_per_ms / UM2_PER_S_TO_NM2_PER_MS, 0.0)

    def truth_speed_um_per_s(self) -> np.ndarray:
        """Speed of directed particles (Circ, Flow), 0 for the others, µm/s."""
        directed = (self.state == CIRC) | (self.state == FLOW)
        return np.where(directed, self.speed_nm_per_ms, 0.0)

    def to_px(self, x_nm: np.ndarray, y_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World nm -> image pixels (centre of pixel (0, 0) at 0.0)."""
        a = self._phys.pixel_size_nm
        return (x_nm - self.origin_nm[0]) / a - 0.5, (y_nm - self.origin_nm[1]) / a - 0.5
