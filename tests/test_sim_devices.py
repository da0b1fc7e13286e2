"""The simulated cameras as Micro-Manager devices, through a real UniMMCore and the shipped .cfg."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("UNICORE_SEQUENCE_BUFFER_MB", "64")

from pymmcore_plus.experimental.unicore import UniMMCore  # noqa: E402
from useq import MDASequence  # noqa: E402

from scopestream.sim_camera import config_path, truth_from_json  # noqa: E402
from scopestream.sim_camera.devices import (  # noqa: E402
    SimulatedScanningCamera,
    SimulatedWidefieldCamera,
    simulated_device,
)

PERIOD_MS = 4.0
SETTINGS = {
    "simulation": {"frame_height_px": 48, "frame_width_px": 64, "n_particles": 8, "particle_kind": "point",
                   "states": ["Stat"], "photons_per_frame": 5000.0, "margin_nm": 1000.0},
    "acquisition": {"exposure_ms": PERIOD_MS, "frame_interval_ms": PERIOD_MS},
    "camera": {"read_noise_e": 1.0},
    "stages": ["frame_stats"],  # other sections are ignored
}


def _core(name: str, settings: dict[str, Any] = SETTINGS, seed: int = 7) -> UniMMCore:
    core = UniMMCore()
    core.loadSystemConfiguration(str(config_path(name)))
    core.setProperty("Camera", "SimulationJSON", json.dumps(settings))
    core.setProperty("Camera", "Seed", seed)
    return core


@pytest.fixture
def widefield() -> Iterator[UniMMCore]:
    core = _core("simulated-widefield")
    yield core
    core.unloadAllDevices()  # release the Python devices and threads before the C++ core goes


def _pop(core: UniMMCore, n: int, timeout_s: float = 10.0) -> list[tuple[np.ndarray, Any]]:
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if core.getRemainingImageCount():
            out.append(core.popNextImageAndMD())
        else:
            time.sleep(0.0005)
    return out


def _spots_match_truth(image: np.ndarray, truth: np.ndarray, offset: float = 100.0) -> None:
    """Every visible particle's pixel is bright; pixels far from all particles are background."""
    signal = image.astype(np.float64) - offset
    visible = truth[truth["visible"]]
    assert visible.size > 0
    rows = np.rint(visible["y"]).astype(int)
    cols = np.rint(visible["x"]).astype(int)
    # Peak pixel of a 5000-photon spot (sigma 0.77 px) holds >= 10 % = 500 photons = 1000 ADU
    # at 0.5 e-/ADU, against a background of 20 +- 7 ADU.
    assert np.all(signal[rows, cols] > 300)
    yy, xx = np.indices(image.shape)
    dist = np.min(np.hypot(yy[..., None] - truth["y"], xx[..., None] - truth["x"]), axis=-1)
    far = dist > 6
    assert abs(signal[far].mean() - 20.0) < 1.0  # 10 photons/px at 0.5 e-/ADU


def test_config_files_load_the_devices(widefield: UniMMCore) -> None:
    assert widefield.getCameraDevice() == "Camera"
    assert widefield.getXYStageDevice() == "XY"
    assert isinstance(simulated_device(widefield), SimulatedWidefieldCamera)
    assert (widefield.getImageHeight(), widefield.getImageWidth()) == (48, 64)
    assert widefield.getExposure() == pytest.approx(PERIOD_MS)
    assert json.loads(widefield.getProperty("Camera", "SimulationJSON")) == SETTINGS


def test_continuous_acquisition_delivers_paced_frames_with_truth(widefield: UniMMCore) -> None:
    widefield.startContinuousSequenceAcquisition()
    t0 = time.perf_counter()
    frames = _pop(widefield, 25)
    elapsed = time.perf_counter() - t0
    widefield.stopSequenceAcquisition()
    assert len(frames) == 25
    numbers = [int(md["ImageNumber"]) for _, md in frames]
    assert numbers == list(range(25))
    sim_frames = [int(md["scopestream_frame"]) for _, md in frames]
    assert sim_frames == list(range(25))
    # Paced at 4 ms with absolute deadlines: the 25th frame is due 100 ms after the camera's
    # start, which precedes t0 by the start call's own duration (a few ms on a busy machine);
    # an unpaced simulator would deliver 25 frames of this size in ~10 ms.
    assert elapsed >= 0.085
    starts = [float(md["scopestream_frame_start_ms"]) for _, md in frames]
    assert np.allclose(np.diff(starts), PERIOD_MS)
    for image, md in frames[::6]:
        assert image.shape == (48, 64) and image.dtype == np.uint16
        _spots_match_truth(image, truth_from_json(md["scopestream_truth"]))
    # The same truth also sits in the device's bounded queue.
    queued = dict(simulated_device(widefield).pop_truth())
    from_metadata = truth_from_json(frames[3][1]["scopestream_truth"])
    assert np.array_equal(queued[3]["particle"], from_metadata["particle"])
    assert np.allclose(queued[3]["x"], from_metadata["x"], atol=1e-4)  # JSON keeps 1e-4 px


def test_mda_delivers_frames_with_truth(widefield: UniMMCore) -> None:
    got: list[tuple[np.ndarray, dict]] = []
    widefield.mda.events.frameReady.connect(lambda img, event, meta: got.append((img.copy(), meta)))
    widefield.mda.run(MDASequence(time_plan={"interval": 0, "loops": 6}))
    assert len(got) == 6
    for image, meta in got:
        truth = truth_from_json(meta["camera_metadata"]["scopestream_truth"])
        _spots_match_truth(image, truth)


def test_snap_based_mda_keeps_truth_in_the_queue(widefield: UniMMCore) -> None:
    widefield.mda.engine.use_hardware_sequencing = False  # one snapImage per event
    got: list[np.ndarray] = []
    widefield.mda.events.frameReady.connect(lambda img, event, meta: got.append(img.copy()))
    camera = simulated_device(widefield)
    camera.pop_truth()
    widefield.mda.run(MDASequence(time_plan={"interval": 0, "loops": 3}))
    queued = camera.pop_truth()
    assert len(got) == 3 and len(queued) == 3
    for image, (_, truth) in zip(got, queued, strict=True):
        _spots_match_truth(image, truth)


def test_xy_stage_shifts_the_field_of_view(widefield: UniMMCore) -> None:
    camera = simulated_device(widefield)
    widefield.snapImage()
    before_image = widefield.getImage().astype(np.float64)
    (_, before), = camera.pop_truth()
    widefield.setXYPosition(1.2, -0.5)  # +12 px in x, -5 px in y at 100 nm/px
    assert widefield.getXYPosition() == pytest.approx((1.2, -0.5))
    widefield.snapImage()
    after_image = widefield.getImage().astype(np.float64)
    (_, after), = camera.pop_truth()
    common, i, j = np.intersect1d(before["particle"], after["particle"], return_indices=True)
    assert common.size >= 5
    assert np.allclose(after["x"][j] - before["x"][i], -12.0)
    assert np.allclose(after["y"][j] - before["y"][i], 5.0)
    # The image content moves too: the cross-correlation peaks at (dy, dx) = (+5, -12).
    a = before_image - before_image.mean()
    b = after_image - after_image.mean()
    xc = np.fft.irfft2(np.fft.rfft2(b) * np.conj(np.fft.rfft2(a)), s=a.shape)
    dy, dx = np.unravel_index(np.argmax(xc), xc.shape)
    assert ((dy + 24) % 48 - 24, (dx + 32) % 64 - 32) == (5, -12)


def test_scanning_camera_device_reports_scan_timing() -> None:
    settings = {"simulation": {"frame_height_px": 16, "frame_width_px": 32, "n_particles": 3,
                               "scan_dwell_us": 2.0, "scan_retrace_ms": 0.2}}
    core = _core("simulated-scanning", settings)
    try:
        assert isinstance(simulated_device(core), SimulatedScanningCamera)
        line_ms = 32 * 2e-3 + 0.2
        assert core.getExposure() == pytest.approx(16 * line_ms)
        core.setExposure(10.0)  # ignored: the scan sets the frame time
        assert core.getExposure() == pytest.approx(16 * line_ms)
        core.startSequenceAcquisition(3, 0, True)
        frames = _pop(core, 3)
        assert len(frames) == 3
        md = frames[1][1]
        assert float(md["scopestream_line_period_ms"]) == pytest.approx(line_ms)
        # Frames start every max(acquisition.frame_interval_ms = 10 ms default, scan time) ms.
        assert float(md["scopestream_frame_period_ms"]) == pytest.approx(10.0)
        assert float(md["scopestream_frame_start_ms"]) == pytest.approx(10.0)
        assert md["scopestream_kind"] == "scanning"
        assert truth_from_json(md["scopestream_truth"]).size >= 3
    finally:
        core.unloadAllDevices()


def test_seed_and_settings_rebuild_the_scene(widefield: UniMMCore) -> None:
    widefield.snapImage()
    first = widefield.getImage().copy()
    widefield.setProperty("Camera", "Seed", 7)  # same seed again: the scene starts over
    widefield.snapImage()
    assert np.array_equal(widefield.getImage(), first)
    with pytest.raises(Exception, match="simulation.D_um2_per_s"):
        widefield.setProperty("Camera", "SimulationJSON", json.dumps({"simulation": {"D_um2_per_s": -1}}))
    with pytest.raises(Exception, match="not valid JSON"):
        widefield.setProperty("Camera", "SimulationJSON", "{nope")
    # A refused setting leaves the camera as it was.
    assert (widefield.getImageHeight(), widefield.getImageWidth()) == (48, 64)


def test_defaults_work_without_settings() -> None:
    core = UniMMCore()
    core.loadSystemConfiguration(str(config_path("simulated-widefield")))
    try:
        assert (core.getImageHeight(), core.getImageWidth()) == (512, 512)
        core.snapImage()
        image = core.getImage()
        truth = simulated_device(core).pop_truth()[0][1]
        assert truth["visible"].sum() >= 90  # 100 particles start in view
        assert image.dtype == np.uint16 and image.max() > 300
    finally:
        core.unloadAllDevices()


def test_simulated_device_is_found_by_property_and_refuses_other_labels(widefield: UniMMCore) -> None:
    camera = simulated_device(widefield, "Camera")
    assert camera is simulated_device(widefield)  # the current camera by default
    assert widefield.getProperty("Camera", "DeviceId") == camera.get_property_value("DeviceId")
    with pytest.raises(LookupError, match="'XY' is not a scopestream simulated camera"):
        simulated_device(widefield, "XY")
    with pytest.raises(LookupError, match="'Nope' is not a scopestream simulated camera"):
        simulated_device(widefield, "Nope")
    # Two cores, two devices: each label finds its own object.
    other = _core("simulated-widefield")
    try:
        assert simulated_device(other) is not camera
    finally:
        other.unloadAllDevices()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_fail_after_frames_ends_a_sequence_like_a_failing_driver(widefield: UniMMCore) -> None:
    assert widefield.getProperty("Camera", "LastError") == ""
    widefield.setProperty("Camera", "FailAfterFrames", 7)
    widefield.startContinuousSequenceAcquisition()
    frames = _pop(widefield, 50, timeout_s=3.0)
    assert len(frames) == 7  # exactly the frames before the failure reach the buffer
    assert not widefield.isSequenceRunning()  # the acquisition thread died, as with a driver error
    assert "FailAfterFrames=7 reached" in widefield.getProperty("Camera", "LastError")
    # The camera's own stamps are its scheduled times: exactly one period apart.
    stamps = np.array([float(md["scopestream_t_acquired_s"]) for _, md in frames])
    assert np.allclose(np.diff(stamps), PERIOD_MS / 1000.0, atol=1e-6)
    # Setting the property again re-arms the count; 0 disarms it.
    widefield.setProperty("Camera", "FailAfterFrames", 0)
    widefield.startSequenceAcquisition(12, 0, True)
    assert len(_pop(widefield, 12)) == 12
