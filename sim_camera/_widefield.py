"""The widefield camera: PSF integrated over pixels, motion blur over the exposure, camera noise.

Each frame ``k`` is exposed from ``k * period`` to ``k * period + exposure_ms`` (``period`` is the
frame interval). The exposure is cut into ``substeps_per_exposure`` equal slices; at the middle of
each slice the scene gives every particle's position and every fluorophore's on/off state, and each
fluorophore that is on adds ``photons_per_frame / (fluorophores * substeps)`` expected photons spread
by the PSF. So a moving particle is blurred along its path and a blinking one dims.

PSF:

- ``gaussian`` (default): sigma = 0.21 λ/NA (or ``psf_sigma_nm``) in focus, widened by defocus
  ``dz`` (the particle's z minus the focal plane, set by the Z stage) as sigma0 sqrt(1 + (dz/z_R)²)
  (``psf_rayleigh_nm``; sigma is rounded to steps of 2 % to reuse tables), integrated exactly over each
  pixel as a product of per-axis differences of the normal CDF (erf). Rendering is separable: for
  each particle, one small patch covering its whole path is the matrix product of the per-axis
  profiles of its emitters (fluorophores x sub-steps), weighted by their photons.
- ``airy``: (2 J1(v)/v)² with v = 2π NA r / λ, integrated over each pixel numerically (8x8 samples)
  for 17x17 sub-pixel emitter positions, interpolated bilinearly between them, truncated at three
  dark rings and renormalized so that all of an emitter's photons land in the image. It is the
  in-focus PSF: defocus is not modelled for it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from scipy.special import j1, ndtr

from scopestream.sim_camera._camera import SimulatedCamera
from scopestream.sim_camera._settings import Physics

_DEFOCUS_STEP = math.log(1.02)  # defocused PSF widths are rounded to 2 % steps (tables are reused)


class _PixelProfile:
    """Pixel-integrated 1-D Gaussian ``g(x) = Φ((x + ½)/σ) − Φ((x − ½)/σ)``, tabulated finely.

    ``x`` is a pixel's centre minus the emitter, px. The table holds ``g`` at ``phases`` points per
    pixel (values from the normal CDF, stored in float32: 6e-8 relative) out to ``|x| <= 8σ + 1`` (beyond, ``g < 1e-15`` and
    is stored as 0), and is padded with zeros out to ``pad_px`` more pixels so that patches up
    to that width need no bounds check. An emitter is rendered from the table entry nearest to
    it: its position is rounded to ``1 / phases`` px (1/4096 px: 0.024 nm at 100 nm pixels), so
    the image is exactly the pixel-integrated PSF of an emitter less than 0.013 nm from where
    the scene put it (the truth keeps the unrounded position) -- a thousand times below any
    localization precision. The pixels of a profile are one pixel (``phases`` entries) apart, so
    in a phase-major copy of the table an emitter's whole profile is one contiguous run: one
    copy per emitter, no error function at run time.
    """

    def __init__(self, sigma_px: float, phases: int = 4096, pad_px: int = 24) -> None:
        reach_px = int(math.ceil(8.0 * sigma_px + 1.0))
        self.phases = phases
        self.centre_px = reach_px + pad_px  # x = 0 is pixel row centre_px, phase 0
        rows = 2 * self.centre_px + 1
        x = np.arange(-self.centre_px * phases, (self.centre_px + 1) * phases) / phases
        g = ndtr((x + 0.5) / sigma_px) - ndtr((x - 0.5) / sigma_px)
        g[np.abs(x) >= reach_px] = 0.0
        self.value = g
        # Phase-major copy: entry [phase, row] is g at x = row - centre_px + phase / phases, so
        # the values of one emitter's profile (one phase, consecutive rows) are contiguous.
        self._by_phase = np.ascontiguousarray(g.reshape(rows, phases).T.astype(np.float32))
        self._rows = rows
        self._phase_bits = phases.bit_length() - 1
        if phases != 1 << self._phase_bits:
            raise ValueError(f"phases must be a power of two, got {phases}")
        self._windows: dict[int, np.ndarray] = {}

    def profiles(self, d_px: np.ndarray, n_px: int) -> np.ndarray:
        """Profiles over pixels ``0 .. n_px - 1`` of emitters at ``d_px`` (shape ``(..., n_px)``).

        ``d_px`` is each emitter's position relative to the centre of pixel 0, px.
        """
        start = np.rint((self.centre_px - d_px) * self.phases).astype(np.intp)  # x = -d at pixel 0
        row = start >> self._phase_bits
        if row.size and row.min() >= 0 and row.max() + n_px <= self._rows:
            # Each profile is one contiguous run of the phase-major table, starting at
            # phase * rows + row; it is gathered as one opaque n_px * 4-byte item (a byte
            # window of the table), which numpy copies three times faster than n_px floats.
            windows = self._windows.get(n_px)
            if windows is None:
                flat = self._by_phase.reshape(-1)
                windows = self._windows[n_px] = np.ndarray(
                    buffer=flat, dtype=np.dtype((np.void, 4 * n_px)), shape=(flat.size - n_px + 1,), strides=(4,)
                )
            first = (start & (self.phases - 1)) * self._rows + row
            return windows[first].view(np.float32).reshape(*start.shape, n_px)
        # Beyond the zero padding (a very wide patch, or a far emitter): gather pixel by pixel.
        idx = start[..., None] + np.arange(0, n_px * self.phases, self.phases)
        np.clip(idx, 0, len(self.value) - 1, out=idx)
        return np.take(self.value, idx)


class _AiryTable:
    """Pixel-integrated Airy patches for a grid of sub-pixel emitter positions."""

    def __init__(self, physics: Physics, phases: int = 16, supersample: int = 8) -> None:
        a = physics.pixel_size_nm
        ring_nm = 0.61 * physics.wavelength_nm / physics.na
        self.half_px = int(math.ceil(3.0 * ring_nm / a)) + 1
        h, s = self.half_px, phases
        self.phases = s
        frac = -0.5 + np.arange(s + 1) / s  # emitter offset from its nearest pixel centre
        sub = (np.arange(supersample) + 0.5) / supersample - 0.5
        q = np.arange(-h, h + 1)
        # Sample points relative to the emitter along one axis: (phase, pixel, subsample).
        axis = q[None, :, None] + sub[None, None, :] - frac[:, None, None]
        dy = axis[:, None, :, None, :, None]
        dx = axis[None, :, None, :, None, :]
        rho_nm = a * np.sqrt(dy**2 + dx**2)
        v = 2 * np.pi * physics.na * rho_nm / physics.wavelength_nm
        with np.errstate(invalid="ignore", divide="ignore"):
            intensity = np.where(v > 1e-9, (2 * j1(v) / np.where(v > 1e-9, v, 1.0)) ** 2, 1.0)
        table = intensity.mean(axis=(4, 5))  # (S+1, S+1, P, P)
        table /= table.sum(axis=(2, 3), keepdims=True)
        self.table = table

    def render(
        self, ex: np.ndarray, ey: np.ndarray, w: np.ndarray, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Expected photons from emitters at (ex, ey) px with weights w: flat pixel indices
        (repeated where patches overlap) and photons."""
        h_img, w_img = shape
        h, s = self.half_px, self.phases
        ix = np.rint(ex).astype(np.int64)
        iy = np.rint(ey).astype(np.int64)
        gx = np.clip((ex - ix + 0.5) * s, 0, s - 1e-9)
        gy = np.clip((ey - iy + 0.5) * s, 0, s - 1e-9)
        jx, jy = gx.astype(np.int64), gy.astype(np.int64)
        tx, ty = gx - jx, gy - jy
        t = self.table
        patch = (
            ((1 - ty) * (1 - tx) * w)[:, None, None] * t[jy, jx]
            + ((1 - ty) * tx * w)[:, None, None] * t[jy, jx + 1]
            + (ty * (1 - tx) * w)[:, None, None] * t[jy + 1, jx]
            + (ty * tx * w)[:, None, None] * t[jy + 1, jx + 1]
        )
        q = np.arange(-h, h + 1)
        rows = iy[:, None] + q
        cols = ix[:, None] + q
        valid = ((rows >= 0) & (rows < h_img))[:, :, None] & ((cols >= 0) & (cols < w_img))[:, None, :]
        flat = rows[:, :, None] * w_img + cols[:, None, :]
        return flat[valid], patch[valid]


class WidefieldSimulator(SimulatedCamera):
    """A widefield camera looking at a :class:`Scene` (see :class:`SimulatedCamera`)."""

    kind = "widefield"

    def __init__(self, physics: Physics, seed: int = 0) -> None:
        super().__init__(physics, seed)
        self._sigma_px = physics.psf_sigma_nm / physics.pixel_size_nm
        self._airy = _AiryTable(physics) if physics.sim.psf_model == "airy" else None
        # Patches reach 4.5 sigma past the emitter's pixel edge: the PSF mass left out is < 1e-5.
        self._half_px = int(math.ceil(4.5 * self._sigma_px + 0.5))
        self._profile = _PixelProfile(self._sigma_px) if self._airy is None else None
        self._rayleigh_nm = physics.psf_rayleigh_nm
        self._defocus_profiles: dict[int, tuple[_PixelProfile, int]] = {}

    @property
    def exposure_ms(self) -> float:
        """Exposure time, ms."""
        return self.physics.exposure_ms

    def set_timing(self, exposure_ms: float, frame_interval_ms: float) -> None:
        """Change exposure and frame interval from the next frame on (the scene carries on).

        A frame interval shorter than the exposure is taken as the exposure.
        """
        if not (exposure_ms > 0 and math.isfinite(exposure_ms)):
            raise ValueError(f"exposure_ms must be positive and finite, got {exposure_ms!r}")
        if not (frame_interval_ms > 0 and math.isfinite(frame_interval_ms)):
            raise ValueError(f"frame_interval_ms must be positive and finite, got {frame_interval_ms!r}")
        self.physics = replace(
            self.physics, exposure_ms=float(exposure_ms), frame_interval_ms=max(float(frame_interval_ms), float(exposure_ms))
        )

    def next_frame(self, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Simulate the next frame.

        Parameters
        ----------
        out
            Optional C-contiguous uint16 array of ``shape`` to write into.

        Returns
        -------
        image, truth
            The frame (uint16, ADU) and its truth rows (see ``TRUTH_DTYPE``).
        """
        phys, scene = self.physics, self.scene
        k, t0 = self._begin_frame()
        n_sub = phys.sim.substeps_per_exposure
        sub_t = t0 + (np.arange(n_sub) + 0.5) * (phys.exposure_ms / n_sub)
        dts = np.diff(np.concatenate([[scene.time_ms], sub_t]))
        path = scene.advance(dts)  # (N, K, 3)
        on = scene.photophysics(dts)  # (N, F, K)
        scene.time_ms = float(sub_t[-1])

        f = scene.n_fluorophores
        photons_per_emitter = scene.photons_per_frame / (f * n_sub)
        w = on * photons_per_emitter[:, None, None]  # (N, F, K) expected photons
        w_sub = w.sum(axis=1)  # (N, K)
        photons = w_sub.sum(axis=1)

        cx, cy = scene.to_px(path[:, :, 0], path[:, :, 1])
        weights = np.where(photons[:, None] > 0, w_sub, 1.0)
        weights = weights / weights.sum(axis=1, keepdims=True)
        truth = self._truth_rows(
            k,
            x=(weights * cx).sum(axis=1),
            y=(weights * cy).sum(axis=1),
            z_nm=(weights * path[:, :, 2]).sum(axis=1),
            t_ms=(weights * sub_t[None, :]).sum(axis=1),
            photons=photons,
        )

        index, photons_px = self._render(w, cx, cy, truth["z"])
        return self._finish_sparse(index, photons_px, t0, out), truth

    def _render(
        self, w: np.ndarray, cx: np.ndarray, cy: np.ndarray, z_nm: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Expected signal photons: flat pixel indices and photons, one entry per pixel of each
        particle's patch (a pixel under overlapping patches appears once per patch)."""
        scene = self.scene
        h_img, w_img = self.shape
        a = self.physics.pixel_size_nm
        bins = self._defocus_bins(z_nm) if self._airy is None else np.zeros(len(z_nm), dtype=np.int64)
        half = self._airy.half_px if self._airy is not None else max(self._half_for(int(bins.max(initial=0))), self._half_px)
        rad_px = 0.5 * scene.diameter_nm / a
        x_lo, x_hi = cx.min(axis=1) - rad_px, cx.max(axis=1) + rad_px
        y_lo, y_hi = cy.min(axis=1) - rad_px, cy.max(axis=1) + rad_px
        keep = np.flatnonzero(
            (w.sum(axis=(1, 2)) > 0)
            & (x_hi + half >= -0.5) & (x_lo - half <= w_img - 0.5)
            & (y_hi + half >= -0.5) & (y_lo - half <= h_img - 0.5)
        )
        if keep.size == 0:
            return np.empty(0, dtype=np.intp), np.empty(0)
        n = keep.size
        off_px = scene.fluor_offset_nm[keep, :, :2] / a  # (n, F, 2)
        ex = (cx[keep][:, None, :] + off_px[:, :, None, 0]).reshape(n, -1)  # (n, F * K) emitters, px
        ey = (cy[keep][:, None, :] + off_px[:, :, None, 1]).reshape(n, -1)
        we = w[keep].reshape(n, -1)
        if self._airy is not None:
            return self._airy.render(ex.ravel(), ey.ravel(), we.ravel(), self.shape)

        # Patch size follows the longest path; group particles by extent so that a few fast
        # ones do not make every patch large. Defocused particles are grouped by PSF width.
        extent = np.maximum(
            np.floor(x_hi[keep] + 0.5) - np.floor(x_lo[keep] + 0.5),
            np.floor(y_hi[keep] + 0.5) - np.floor(y_lo[keep] + 0.5),
        )
        small = extent <= max(float(np.sort(extent)[(3 * len(extent)) // 4]), 1.0)
        kept_bins = bins[keep]
        index_parts, value_parts = [], []
        for b in np.unique(kept_bins):
            profile, half_b = self._profile_for(int(b))
            in_bin = kept_bins == b
            for group in (np.flatnonzero(small & in_bin), np.flatnonzero(~small & in_bin)):
                if group.size:
                    index, value = self._render_gaussian(
                        ex[group], ey[group], we[group], x_lo[keep][group], x_hi[keep][group],
                        y_lo[keep][group], y_hi[keep][group], half_b, profile,
                    )
                    index_parts.append(index)
                    value_parts.append(value)
        return np.concatenate(index_parts), np.concatenate(value_parts)

    def _defocus_bins(self, z_nm: np.ndarray) -> np.ndarray:
        """Per particle: k such that its PSF sigma is sigma0 * 1.02**k (0 in focus)."""
        dz = np.asarray(z_nm, dtype=np.float64) - self.focus_nm
        if not dz.any():
            return np.zeros(dz.shape, dtype=np.int64)
        growth = 0.5 * np.log1p((dz / self._rayleigh_nm) ** 2)  # log(sigma / sigma0)
        return np.rint(growth / _DEFOCUS_STEP).astype(np.int64)

    def _half_for(self, b: int) -> int:
        return int(math.ceil(4.5 * self._sigma_px * 1.02**b + 0.5))

    def _profile_for(self, b: int) -> tuple[_PixelProfile, int]:
        """The pixel profile and patch half-width for defocus bin ``b`` (cached)."""
        if b == 0:
            assert self._profile is not None
            return self._profile, self._half_px
        cached = self._defocus_profiles.get(b)
        if cached is None:
            if len(self._defocus_profiles) >= 64:
                self._defocus_profiles.pop(next(iter(self._defocus_profiles)))
            cached = self._defocus_profiles[b] = (_PixelProfile(self._sigma_px * 1.02**b), self._half_for(b))
        return cached

    def _render_gaussian(
        self,
        ex: np.ndarray,
        ey: np.ndarray,
        we: np.ndarray,
        x_lo: np.ndarray,
        x_hi: np.ndarray,
        y_lo: np.ndarray,
        y_hi: np.ndarray,
        half: int,
        profile: _PixelProfile,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-integrated Gaussian patches, one per particle: flat pixel indices and photons."""
        h_img, w_img = self.shape
        c0 = np.floor(x_lo + 0.5).astype(np.int64) - half
        r0 = np.floor(y_lo + 0.5).astype(np.int64) - half
        pw = int((np.floor(x_hi + 0.5) - np.floor(x_lo + 0.5)).max()) + 2 * half + 1
        ph = int((np.floor(y_hi + 0.5) - np.floor(y_lo + 0.5)).max()) + 2 * half + 1
        prof_x = profile.profiles(ex - c0[:, None], pw)  # (n, emitters, pw)
        prof_y = profile.profiles(ey - r0[:, None], ph)
        patch = np.matmul((prof_y * we[:, :, None].astype(np.float32)).transpose(0, 2, 1), prof_x)  # (n, ph, pw)
        flat = (r0 * w_img + c0)[:, None] + (np.arange(ph)[:, None] * w_img + np.arange(pw)).ravel()
        if r0.min() >= 0 and c0.min() >= 0 and (r0 + ph).max() <= h_img and (c0 + pw).max() <= w_img:
            return flat.ravel(), patch.ravel()  # every patch lies inside the frame
        rows = r0[:, None] + np.arange(ph)
        cols = c0[:, None] + np.arange(pw)
        valid = (((rows >= 0) & (rows < h_img))[:, :, None] & ((cols >= 0) & (cols < w_img))[:, None, :]).reshape(
            len(r0), -1
        )
        return flat[valid], patch.reshape(len(r0), -1)[valid]
