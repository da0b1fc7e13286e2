"""What both simulated cameras share: the scene and noise they own, the frame clock, the stage
offset, and how a frame's truth rows and its noisy image are finished."""

from __future__ import annotations

import numpy as np

from scopestream.sim_camera._noise import CameraNoise
from scopestream.sim_camera._scene import Scene
from scopestream.sim_camera._settings import Physics
from scopestream.sim_camera._truth import empty_truth


class SimulatedCamera:
    """Base of :class:`WidefieldSimulator` and :class:`ScanningSimulator`; one call per frame.

    Parameters
    ----------
    physics
        Validated settings (see :func:`physics_from_config`).
    seed
        Seed of the simulation's random generator; same seed, same movie and truth.

    Attributes
    ----------
    frame_index : int
        Index of the next frame.
    next_frame_start_ms : float
        Scene time at which the next frame starts, ms.
    last_saturated_px : int
        Pixels clipped at the saturation level in the last frame.
    shutter_open : bool
        False: the excitation light is shut, frames are dark (camera offset, background and
        noise; no particle signal) while the scene carries on. Default True.
    """

    kind = ""

    def __init__(self, physics: Physics, seed: int = 0) -> None:
        self.physics = physics
        self._rng = np.random.default_rng(seed)
        self.scene = Scene(physics, self._rng, z_diffusion=physics.z_diffusion(self.kind))
        self.noise = CameraNoise(physics, self._rng)
        self.shape = (physics.sim.frame_height_px, physics.sim.frame_width_px)
        self.frame_index = 0
        self.next_frame_start_ms = 0.0
        self.last_saturated_px = 0
        self.focus_nm = 0.0
        self.shutter_open = True

    def set_stage_position_nm(self, x_nm: float, y_nm: float) -> None:
        """Move the field of view: its top-left corner goes to world (x_nm, y_nm).

        Takes effect at the next frame; particles left outside the band around the new field
        of view are replaced by new ones.
        """
        self.scene.origin_nm = (float(x_nm), float(y_nm))

    def set_focus_nm(self, z_nm: float) -> None:
        """Move the focal plane to world z = ``z_nm`` (a focus / Z stage); takes effect at the next
        frame. A particle at z is imaged with defocus ``z - z_nm``."""
        self.focus_nm = float(z_nm)

    @property
    def exposure_ms(self) -> float:
        """Time the camera needs to record one frame (exposure, or the whole scan), ms."""
        raise NotImplementedError

    @property
    def frame_period_ms(self) -> float:
        """Time from one frame's start to the next's: the frame interval, or longer if the camera
        needs longer, ms."""
        return max(self.physics.frame_interval_ms, self.exposure_ms)

    def _begin_frame(self) -> tuple[int, float]:
        """Switch motion states between frames and replace particles that left; (index, start ms)."""
        if self.frame_index > 0:
            self.scene.switch_states(self.frame_period_ms)
        self.scene.respawn_outside()
        return self.frame_index, self.next_frame_start_ms

    def _truth_rows(
        self, k: int, x: np.ndarray, y: np.ndarray, z_nm: np.ndarray, t_ms: np.ndarray, photons: np.ndarray
    ) -> np.ndarray:
        """Frame ``k``'s truth: the given centroids plus each particle's state, D and speed."""
        scene = self.scene
        h_img, w_img = self.shape
        truth = empty_truth(len(photons))
        truth["frame"] = k
        truth["particle"] = scene.particle_id
        truth["x"] = x
        truth["y"] = y
        truth["z"] = z_nm
        truth["t_ms"] = t_ms
        truth["state"] = scene.state_names()
        truth["D_um2_per_s"] = scene.truth_D_um2_per_s()
        truth["speed_um_per_s"] = scene.truth_speed_um_per_s()
        truth["photons"] = photons
        truth["visible"] = (x >= -0.5) & (x < w_img - 0.5) & (y >= -0.5) & (y < h_img - 0.5)
        return truth

    def _finish_frame(self, signal: np.ndarray, t0_ms: float, out: np.ndarray | None) -> np.ndarray:
        """Camera noise over the expected photons ``signal`` (frame shape); advance the frame clock."""
        flat = signal.reshape(-1)
        touched = np.flatnonzero(flat > 0)
        return self._finish_sparse(touched, flat[touched], t0_ms, out)

    def _finish_sparse(
        self, index: np.ndarray, photons: np.ndarray, t0_ms: float, out: np.ndarray | None
    ) -> np.ndarray:
        """As :meth:`_finish_frame`, with the signal given at flat pixel ``index`` only (a pixel
        may appear more than once; its photons add up)."""
        image = out if out is not None else np.empty(self.shape, dtype=np.uint16)
        if not self.shutter_open:  # shut: no particle photons reach the camera
            index, photons = index[:0], photons[:0]
        self.last_saturated_px = self.noise.render(image, index, photons)
        self.frame_index += 1
        self.next_frame_start_ms = t0_ms + self.frame_period_ms
        return image
