"""The scanning two-photon camera: a beam visits the pixels one at a time while emitters move.

Timing (Netterstrøm et al.): the beam dwells ``scan_dwell_us`` on each pixel of a line, left to
right, then a retrace of ``scan_retrace_ms`` records nothing; lines follow top to bottom. Pixel
``(row r, column c)`` of frame ``k`` is seen at

    t = k * period + r * line_period + (c + 0.5) * dwell,    line_period = width * dwell + retrace,

with ``period = max(acquisition.frame_interval_ms, height * line_period)``. So rows are acquired at
different times, and a moving emitter is sheared and stretched by the scan.

Expected photons in a pixel: background plus, for every fluorophore that is on, ``peak *
exp(-(dx² + dy²) / (2 σxy²) - dz² / (2 σz²))`` with (dx, dy, dz) the emitter's offset from the
beam focus at that pixel's dwell time (3-D Gaussian excitation PSF; the focal plane sits at
``focus_nm``, the Z stage's position). The peak is set so that a
stationary in-focus particle sends ``photons_per_frame`` photons in total over the frame (``peak =
photons_per_frame / (fluorophores * 2π (σxy / pixel)²)``). Counts go through the camera noise model
(Poisson shot noise first).

Motion is stepped at the dwell time where it matters: on each line, the particles close enough to
the line to be excited get their path sampled at every dwell time of a window of columns around
them; elsewhere the scene is advanced line by line with the exact increments of the same process
(Gaussian increments compose), so the law of every path is that of dwell-time stepping. Blinking
states are updated once per line (lines last about a millisecond; on/off times are far longer).

Ground truth: for each particle, the centroid of its centre's trajectory over the dwell times the
beam spent near it, weighted by the photons it sent to the detector at each of them -- what a
localizer fitting this frame should report -- with ``t_ms`` the same weighted mean time.
"""

from __future__ import annotations

import math

import numpy as np

from scopestream.sim_camera._camera import SimulatedCamera
from scopestream.sim_camera._scene import UM2_PER_S_TO_NM2_PER_MS
from scopestream.sim_camera._settings import Physics, range_bounds


class ScanningSimulator(SimulatedCamera):
    """A raster-scanning two-photon microscope looking at a :class:`Scene` (see :class:`SimulatedCamera`)."""

    kind = "scanning"

    def __init__(self, physics: Physics, seed: int = 0) -> None:
        super().__init__(physics, seed)
        sim = physics.sim
        a = physics.pixel_size_nm
        self.dwell_ms = sim.scan_dwell_us * 1e-3
        self.line_period_ms = physics.line_period_ms
        self._sigma_px = sim.scan_sigma_xy_nm / a
        self._sigma_z_nm = sim.scan_sigma_z_nm
        # Largest distance a particle can travel during one line (speeds in nm/ms; 5 SD for
        # Brownian motion): the window around each particle must cover it.
        t = self.line_period_ms
        d_max = range_bounds(sim.D_um2_per_s)[1] * UM2_PER_S_TO_NM2_PER_MS
        v_max = max(range_bounds(sim.flow_speed_um_per_s)[1], range_bounds(sim.circ_speed_um_per_s)[1])
        motion_px = (v_max * t + 5.0 * math.sqrt(2.0 * d_max * t)) / a
        rad_px = 0.5 * range_bounds(sim.vesicle_diameter_nm)[1] / a if sim.particle_kind == "vesicle" else 0.0
        self._reach_px = 4.0 * self._sigma_px + rad_px + motion_px
        self._window_px = min(self.shape[1], 2 * int(math.ceil(self._reach_px)) + 1)

    @property
    def exposure_ms(self) -> float:
        """Time to scan one frame, ms."""
        return self.physics.scan_frame_ms

    def row_start_ms(self, frame_start_ms: float) -> np.ndarray:
        """Times at which the beam starts each row of the frame that starts at ``frame_start_ms``, ms."""
        return frame_start_ms + np.arange(self.shape[0]) * self.line_period_ms

    def next_frame(self, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scan the next frame.

        Returns
        -------
        image, truth
            The frame (uint16, ADU) and its truth rows (see ``TRUTH_DTYPE``).
        """
        phys, scene = self.physics, self.scene
        k, t0 = self._begin_frame()
        gap = t0 - scene.time_ms
        if gap > 0:
            scene.advance(np.array([gap]))
            scene.photophysics(np.array([gap]))
        scene.time_ms = t0

        h_img, w_img = self.shape
        a = phys.pixel_size_nm
        n_all = len(scene.state)
        f = scene.n_fluorophores
        sigma2 = self._sigma_px**2
        peak = scene.photons_per_frame / (f * 2.0 * np.pi * sigma2)
        ox, oy = scene.origin_nm
        dwell, line_ms = self.dwell_ms, self.line_period_ms
        k_win = self._window_px
        half = k_win // 2
        reach = self._reach_px
        win = np.arange(k_win)
        line_dt = np.array([line_ms])

        signal = np.zeros((h_img, w_img))
        w_sum = np.zeros(n_all)
        w_pos = np.zeros((n_all, 3))
        w_t = np.zeros(n_all)
        seen = np.zeros(n_all)
        seen_pos = np.zeros((n_all, 3))
        seen_t = np.zeros(n_all)
        mid_pos = scene.pos_nm.copy()
        mid_t = np.full(n_all, t0 + 0.5 * h_img * line_ms)

        for r in range(h_img):
            t_line = t0 + r * line_ms
            if r == h_img // 2:
                mid_pos = scene.pos_nm.copy()
            cx = (scene.pos_nm[:, 0] - ox) / a - 0.5
            cy = (scene.pos_nm[:, 1] - oy) / a - 0.5
            near = np.flatnonzero(
                (np.abs(cy - r) <= reach) & (cx >= -reach) & (cx <= w_img - 1 + reach)
            )
            if near.size:
                c0 = np.clip(np.rint(cx[near]).astype(np.int64) - half, 0, w_img - k_win)
                first = (c0 + 0.5) * dwell
                last = line_ms - (c0 + k_win - 0.5) * dwell
                # One call moves everyone through the line: the particles near it are sampled at
                # each dwell time of their window, the others take one step of a line period.
                dts = np.zeros((n_all, k_win + 1))
                dts[:, 0] = line_ms
                dts[near, 0] = first
                dts[near, 1:k_win] = dwell
                dts[near, k_win] = last
                path = scene.advance(dts)[near, :k_win]  # (n, K, 3) at the dwell times
                off = scene.fluor_offset_nm[near]  # (n, F, 3)
                on = scene.fluor_state[near] == 0  # (n, F)
                cols = c0[:, None] + win  # (n, K)
                dx = (path[:, None, :, 0] + off[:, :, None, 0] - ox) / a - 0.5 - cols[:, None, :]
                dy = (path[:, None, :, 1] + off[:, :, None, 1] - oy) / a - 0.5 - r
                dz = path[:, None, :, 2] + off[:, :, None, 2] - self.focus_nm
                excitation = np.exp(
                    -(dx * dx + dy * dy) / (2.0 * sigma2) - (dz * dz) / (2.0 * self._sigma_z_nm**2)
                )
                value = (excitation * on[:, :, None]).sum(axis=1) * peak[near, None]  # (n, K)
                signal[r] += np.bincount(cols.ravel(), weights=value.ravel(), minlength=w_img)
                times = t_line + (cols + 0.5) * dwell
                w_sum[near] += value.sum(axis=1)
                w_pos[near] += np.einsum("nk,nkd->nd", value, path)
                w_t[near] += (value * times).sum(axis=1)
                seen[near] += k_win
                seen_pos[near] += path.sum(axis=1)
                seen_t[near] += times.sum(axis=1)
            else:
                scene.advance(line_dt)
            scene.photophysics(line_dt)
        scene.time_ms = t0 + h_img * line_ms

        truth = self._truth(k, w_sum, w_pos, w_t, seen, seen_pos, seen_t, mid_pos, mid_t)
        return self._finish_frame(signal, t0, out), truth

    def _truth(
        self,
        k: int,
        w_sum: np.ndarray,
        w_pos: np.ndarray,
        w_t: np.ndarray,
        seen: np.ndarray,
        seen_pos: np.ndarray,
        seen_t: np.ndarray,
        mid_pos: np.ndarray,
        mid_t: np.ndarray,
    ) -> np.ndarray:
        """Photon-weighted centroids; particles that sent nothing fall back on where they were."""
        scene = self.scene
        lit = w_sum > 0
        was_seen = ~lit & (seen > 0)
        pos = mid_pos.copy()
        t = mid_t.copy()
        pos[lit] = w_pos[lit] / w_sum[lit, None]
        t[lit] = w_t[lit] / w_sum[lit]
        pos[was_seen] = seen_pos[was_seen] / seen[was_seen, None]
        t[was_seen] = seen_t[was_seen] / seen[was_seen]
        x, y = scene.to_px(pos[:, 0], pos[:, 1])
        return self._truth_rows(k, x, y, z_nm=pos[:, 2], t_ms=t, photons=w_sum)
