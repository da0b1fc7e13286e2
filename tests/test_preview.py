"""The ``preview`` stage: rate cap, binning, and the published image against the frames it came from."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import Subscriber
from scopestream.plugins.preview import PreviewSettings, PreviewStage, bin_image


def test_rate_cap_on_a_driven_clock() -> None:
    # A 64 frames/s camera for 8 s with an 8 Hz cap (binary fractions: exact times): one frame in
    # eight, every frame accounted for.
    now = [0.0]
    stage = PreviewStage(None, PreviewSettings(max_rate_hz=8), clock=lambda: now[0])
    published, skipped = [], 0
    for i in range(512):
        now[0] = i / 64
        out = stage.process(Frame(i, np.zeros((8, 8), np.uint16), 0.0), None)
        if out:
            published.append(i)
            skipped += out[0].body.frames_skipped  # type: ignore[attr-defined]
    assert len(published) == 64
    assert np.all(np.diff(published) == 8)
    assert skipped + len(published) == published[-1] + 1
    # After a stall the cap resumes without a burst: the next frames are 1/8 s apart again.
    now[0] = 100.0
    assert stage.process(Frame(512, np.zeros((8, 8), np.uint16), 0.0), None)
    now[0] = 100.0625
    assert not stage.process(Frame(513, np.zeros((8, 8), np.uint16), 0.0), None)
    now[0] = 100.125
    assert stage.process(Frame(514, np.zeros((8, 8), np.uint16), 0.0), None)


@pytest.mark.parametrize("bin_px", [1, 2, 4])
def test_binning_is_the_rounded_block_mean(bin_px: int) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 65536, (67, 70), dtype=np.uint16)  # sides not multiples of 4
    h, w = 67 // bin_px * bin_px, 70 // bin_px * bin_px
    expected = np.floor(image[:h, :w].reshape(h // bin_px, bin_px, w // bin_px, bin_px).mean(axis=(1, 3)) + 0.5)
    out = bin_image(image, bin_px)
    assert out.dtype == np.uint16 and out.shape == (67 // bin_px, 70 // bin_px)
    np.testing.assert_array_equal(out, expected)
    floats = np.array([[-5.0, np.nan], [70000.0, 12.4]])
    np.testing.assert_array_equal(bin_image(floats, 1), [[0, 0], [65535, 12]])


@pytest.mark.parametrize("bin_px", [1, 2])
def test_live_preview_matches_the_replayed_frames(
    bin_px: int, tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    rng = np.random.default_rng(bin_px)
    movie = rng.integers(90, 4000, (60, 32, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    config = make_config(
        "source.kind=file", f"source.file_path={tmp_path / 'm.tif'}", "source.replay_fps=100",
        "stages=[preview]", "preview.max_rate_hz=10", f"preview.bin={bin_px}", "events.wait_for_subscriber_s=20",
    )
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint, topics=["preview", "run_stop"])
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(20)
    starter.join(20)
    previews = []
    while (m := sub.recv(20)) is not None and m.topic != "run_stop":
        previews.append(m)
    assert m is not None and m.topic == "run_stop"
    duration_s = m.body["duration_s"]
    # At most one preview per 0.1 s of the run, plus the first; at least one per 0.2 s (a 100 frames/s
    # replay always has a frame within 10 ms of each due time; 0.2 s leaves room for a busy machine).
    assert math.floor(duration_s / 0.2) <= len(previews) <= math.ceil(duration_s / 0.1) + 1
    seen = 0
    for p in previews:
        k = p.header.frame_seq
        assert p.body["frame_seq"] == k and p.body["bin"] == bin_px
        expected = bin_image(movie[k], bin_px)
        np.testing.assert_array_equal(p.arrays["image"], expected)
        seen += p.body["frames_skipped"] + 1
    assert seen == previews[-1].header.frame_seq + 1
