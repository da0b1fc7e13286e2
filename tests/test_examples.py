"""The shipped clients in examples/, against a real daemon on the simulated camera: the Python
follower (checked against the simulator's truth) and the JavaScript client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import Subscriber

sys.path.insert(0, str(Path(__file__).parent))
from follow_harness import EXAMPLES, run_following, scene, summary  # noqa: E402

JS = EXAMPLES / "js"


def test_follower_keeps_a_random_walker_near_the_centre() -> None:
    """RanW, D = 0.5 µm²/s, 10 ms frames, 100 nm px: one frame's step is 1 px RMS per axis. A move
    shows two frames after the frame that asked for it (the simulated camera renders a frame one
    period before delivering it), so even a perfect follower leaves the particle where two frames of
    diffusion took it: radial RMS 2 px, and 2 px is exceeded in e^-1 = 37 % of frames. The bound:
    never lost (within 16 px, a quarter of the field, in every frame) and RMS within 2.5x that
    floor (the 2-core build machine adds scheduling delay to the loop)."""
    result = run_following(scene("RanW", 0.5), 300)
    s = summary(result["distances_px"])
    assert s["frames"] >= 250
    assert s["max_px"] < 16.0, s  # never lost (a lost particle leaves the field: inf)
    assert s["rms_px"] < 5.0, s
    assert result["moves"] > 100


@pytest.mark.xfail(reason="not reached yet: the follower loses a 5 px/frame Flow particle after ~100-200 frames "
                   "(velocity lead vs. 2-frame loop delay); see the issue 12 note", strict=False)
def test_follower_keeps_a_flowing_particle_in_view() -> None:
    """Flow at 500 nm per 10 ms frame (50 µm/s = 5 px/frame): without the stage the particle crosses
    the 64 px field in 13 frames; followed, it stays in view for the whole run."""
    result = run_following(scene("Flow", 50.0), 300)
    d = result["distances_px"]
    assert np.isfinite(d).all(), summary(d)  # never lost
    assert np.max(d) < 32.0, summary(d)  # always inside the field


def test_javascript_client_decodes_events_and_acts(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "zeromq").is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must run the JavaScript client: node and examples/js/node_modules (npm install) are missing")
        pytest.skip("node or the npm package zeromq is not installed (cd examples/js && npm install)")
    config = make_config(
        "stages=[frame_stats,localize,track]", "simulation.frame_height_px=64", "simulation.frame_width_px=64",
        "simulation.n_particles=6", "simulation.particle_kind=point", "simulation.states=[Stat]",
        "simulation.photons_per_frame=4000", "metrics.enabled=false",
    )
    d = Daemon(config)
    daemons.append(d)
    assert d.events_endpoint and d.control_endpoint
    actions = Subscriber(d.events_endpoint, ["action"])
    d.start()
    assert actions.wait_ready()
    out: dict[str, subprocess.CompletedProcess[str]] = {}
    runner = threading.Thread(target=lambda: out.setdefault("p", subprocess.run(
        [node, str(JS / "client.js"), d.events_endpoint or "", d.control_endpoint or "", "20"],
        capture_output=True, text=True, timeout=60)))
    runner.start()
    runner.join(70)
    proc = out["p"]
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tracks"] == 20 and result["gaps"] == 0
    assert result["rows"] >= 20  # several stationary particles per frame
    assert 0.0 <= result["x_mean"] <= 63.0  # decoded float64 positions inside the image
    assert result["act"]["ok"] and result["act"]["state"]["text"].startswith("js client saw frame")
    msg = actions.recv(5)
    assert msg is not None and msg.body["requested_by"] == "js" and msg.body["trigger_topic"] == "track"
    assert msg.body["trigger_frame_seq"] == result["frame_seq"]
    actions.close()


def test_examples_folder_ships_both_clients() -> None:
    assert (EXAMPLES / "follow_particle.py").is_file() and (JS / "client.js").is_file() and (JS / "package.json").is_file()
    assert Path(EXAMPLES / "js" / "package.json").read_text().count('"zeromq"') == 1
