"""Motion-state networks and the live ``motion`` stage: training, shipped weights against fresh
simulated truth, backends agreeing, the stage on a simulated movie with a state switch, bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from scopestream.daemon._config import ScopestreamConfig, load_config
from scopestream.daemon._frames import Frame
from scopestream.daemon._messages import SourceDescription
from scopestream.daemon._offload import Offload, ThreadBackend
from scopestream.daemon._products import MOTION_STATES, Products, TrackWindow, TrackWindows
from scopestream.daemon._stage import RunContext
from scopestream.models._card import ModelLoadError, load_model_folder
from scopestream.models.motion._data import generate_dataset
from scopestream.models.motion._inputs import FEATURE_NAMES, InputSpec, track_features
from scopestream.plugins.motion import (
    MODEL_MAJOR_VERSION,
    MotionSettings,
    MotionStage,
    default_model_dir,
)
from scopestream.sim_camera import simulate_stack

SHIPPED = default_model_dir()


def _context(config: ScopestreamConfig) -> RunContext:
    return RunContext(
        frame_shape_px=(64, 64), dtype=np.dtype(np.uint16), pixel_size_nm=config.optics.pixel_size_nm,
        frame_interval_ms=10.0, exposure_ms=10.0, camera=config.camera, optics=config.optics,
        source=SourceDescription(kind="file", detail="test", width_px=64, height_px=64, dtype="uint16", mode="replay"),
        offload=Offload(ThreadBackend(1), max_in_flight_jobs=64),
    )


def _card() -> dict:
    return json.loads((SHIPPED / "card.json").read_text())


# -- features ------------------------------------------------------------------------------------


def test_features_separate_ideal_paths() -> None:
    """Noise-free paths of each kind give the feature values their geometry dictates."""
    t = np.arange(200.0)
    omega = 2 * np.pi * 5 / 200  # five whole laps: the centroid is the circle's centre
    circle = np.c_[3 * np.cos(omega * t), 3 * np.sin(omega * t)]  # px: a 300 nm circle
    line = np.c_[0.5 * t, 0.1 * t]
    still = np.zeros((200, 2))
    f_circ, f_line, f_still = (dict(zip(FEATURE_NAMES, track_features(p, 100.0), strict=True)) for p in (circle, line, still))
    # float32 features: 1e-6 tolerances
    assert f_circ["angular_consistency"] == pytest.approx(1.0, abs=1e-6)  # always turning the same way
    assert f_circ["abs_mean_angular_speed_rad"] == pytest.approx(omega, abs=1e-6)
    assert f_circ["ringness"] == pytest.approx(0.0, abs=1e-6)  # every point 300 nm from the centre
    assert f_circ["straightness"] < 0.01
    assert f_line["straightness"] == pytest.approx(1.0, abs=1e-6)
    assert f_line["mean_cos_turn"] == pytest.approx(1.0, abs=1e-6)
    assert f_line["msd_exponent"] == pytest.approx(2.0, abs=1e-6)  # ballistic: MSD ∝ lag²
    assert f_still["log_step_nm"] == 0.0 and f_still["log_radius_gyration_nm"] == 0.0
    gappy = line.copy()
    gappy[::3] = np.nan
    assert np.isfinite(track_features(gappy, 100.0)).all()
    assert np.isfinite(track_features(np.full((50, 2), np.nan), 100.0)).all()


# -- training --------------------------------------------------------------------------------------


def test_tiny_training_run_loss_falls(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from scopestream.models.motion._train import TrainSettings, train_one

    # 4 movies per state of 100 frames -> 60 windows (K = 100 and 2 × K = 50): a few seconds.
    ds = generate_dataset(seed=123, movies_per_state=4, spec=InputSpec(), k_long=100, k_short=50)
    assert len(ds) == 60 and set(ds.labels.tolist()) == set(range(5))
    settings = TrainSettings(out=tmp_path, epochs=12, batch_size=16, lr=5e-3, channels=4, progress=False, threads=1)
    model, curves = train_one("fused", ds, ds, settings, log=lambda _: None)
    loss = curves["train_loss"]
    # Cross-entropy starts near ln 5 = 1.61 for an untrained 5-way classifier; a network that learns
    # anything from 60 windows brings its training loss well below that within 12 epochs.
    assert loss[0] > 1.0
    assert min(loss[-3:]) < 0.7 * loss[0], loss
    assert (tmp_path / "checkpoints" / "fused" / "best.pt").is_file()


# -- the shipped weights --------------------------------------------------------------------------


def test_shipped_model_folder_is_complete_and_small() -> None:
    folder = load_model_folder(SHIPPED, name="motion", major_version=MODEL_MAJOR_VERSION, feature_names=FEATURE_NAMES)
    card = folder.card
    assert card.classes == list(MOTION_STATES)
    for key in ("command", "seed", "commit", "train_windows", "test_windows", "time_s"):
        assert key in card.training, key
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 10 * 2**20
    assert (SHIPPED / "MODEL_CARD.md").read_text().startswith("# Model card")


def test_shipped_weights_on_fresh_simulated_truth() -> None:
    """Accuracy on a test set from a seed never used in training (training: seed 0, its test set
    10**9; here 7 · 10**9), K = 200, windows whose motion exceeds the localization precision.

    Bound: the issue's target, 0.95, minus three binomial standard errors of this set's size
    (sqrt(0.95 · 0.05 / n)); a model that truly reaches 0.95 fails this with probability < 0.2 %.
    """
    from scopestream.models._backends import OnnxRuntimeBackend

    folder = load_model_folder(SHIPPED, name="motion", major_version=MODEL_MAJOR_VERSION)
    spec = InputSpec(**folder.card.input_spec)
    ds = generate_dataset(seed=7 * 10**9, movies_per_state=8, spec=spec, k_long=200, k_short=200)
    keep = (ds.labels == 0) | (ds.speed_nm_per_frame >= 20.0)
    ds = ds.subset(keep)
    backend = OnnxRuntimeBackend()
    backend.load(folder)
    probs = backend.run({"image": ds.images.astype(np.float32)[:, None], "features": ds.features})["probabilities"]
    accuracy = float(np.mean(probs.argmax(1) == ds.labels))
    n = len(ds)
    bound = 0.95 - 3 * math.sqrt(0.95 * 0.05 / n)
    assert n >= 30
    assert accuracy >= bound, f"accuracy {accuracy:.3f} on {n} windows < {bound:.3f}"


def test_onnxruntime_and_torch_give_the_same_probabilities() -> None:
    pytest.importorskip("torch")
    from scopestream.models._backends import OnnxRuntimeBackend, TorchBackend

    folder = load_model_folder(SHIPPED, name="motion", major_version=MODEL_MAJOR_VERSION)
    ds = generate_dataset(seed=11 * 10**9, movies_per_state=1, spec=InputSpec(**folder.card.input_spec), k_long=100, k_short=50)
    inputs = {"image": ds.images.astype(np.float32)[:, None], "features": ds.features}
    out = []
    for backend in (OnnxRuntimeBackend(), TorchBackend("cpu")):
        backend.load(folder)
        backend.warm_up(2)
        out.append(backend.run(inputs)["probabilities"])
    assert out[0].shape == (len(ds), 5)
    np.testing.assert_allclose(out[0].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[0], out[1], atol=1e-4, rtol=0)


def test_tensorrt_backend_says_what_it_needs() -> None:
    from scopestream.models._backends import TensorRTBackend

    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU with TensorRT is here: the benchmark times it")
    except ImportError:
        pass
    folder = load_model_folder(SHIPPED, name="motion", major_version=MODEL_MAJOR_VERSION)
    with pytest.raises(ModelLoadError, match="TensorRT|CUDA|GPU"):
        TensorRTBackend().load(folder)


# -- bad model folders -----------------------------------------------------------------------------


def test_missing_or_foreign_weights_are_named(tmp_path: Path) -> None:
    config = load_config(None, ["motion.model_dir=" + str(tmp_path / "nowhere")])
    stage = MotionStage(config, config.stage_settings("motion"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nowhere"):
        stage.setup(_context(config))
    for field, value, message in (("version", "2.0.0", "major version 2"), ("name", "diffusion", "holds model 'diffusion'")):
        folder = tmp_path / f"bad_{field}"
        shutil.copytree(SHIPPED, folder)
        card = _card()
        card[field] = value
        (folder / "card.json").write_text(json.dumps(card))
        config = load_config(None, [f"motion.model_dir={folder}"])
        stage = MotionStage(config, config.stage_settings("motion"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=message):
            stage.setup(_context(config))
    folder = tmp_path / "altered"
    shutil.copytree(SHIPPED, folder)
    (folder / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model_folder(folder, name="motion", major_version=MODEL_MAJOR_VERSION)
    with pytest.raises(ModelLoadError, match="shape"):
        load_model_folder(SHIPPED, name="motion", major_version=MODEL_MAJOR_VERSION, inputs={"image": [-1, 1, 50, 50]})


# -- the stage -------------------------------------------------------------------------------------


def test_bad_windows_are_skipped_and_counted_never_raised() -> None:
    config = load_config(None)
    stage = MotionStage(config, MotionSettings())
    context = _context(config)
    stage.setup(context)
    rng = np.random.default_rng(0)
    good = (100 + rng.poisson(20, (60, 25, 25))).astype(np.float32)
    pos = np.c_[np.full(60, 12.0), np.full(60, 12.0)]
    nan_px = good.copy()
    nan_px[3, 4, 5] = np.nan
    windows = TrackWindows(59, (
        TrackWindow(1, 0, 59, 0, 0, nan_px, pos),
        TrackWindow(2, 0, 59, 0, 0, np.full((60, 25, 25), 100.0, np.float32), pos),
        TrackWindow(3, 0, 59, 0, 0, good, np.full((60, 2), np.nan)),
        TrackWindow(4, 0, 59, 0, 0, good[:, :20, :20], pos[:, :]),
        TrackWindow(5, 0, 59, 0, 0, good, pos),
    ))
    frame = Frame(seq=59, image=np.zeros((64, 64), np.uint16), t_acquired=0.0)
    emissions = stage.process(frame, Products(windows))
    skipped = {e.body.particle: e.body for e in emissions if e.topic == "motion_skipped"}  # type: ignore[attr-defined]
    assert set(skipped) == {1, 2, 3, 4}
    assert all(b.reason == "invalid" for b in skipped.values())
    assert "NaN" in skipped[1].detail and "constant" in skipped[2].detail and "0%" in skipped[3].detail
    assert context.offload.wait_idle(60)  # type: ignore[attr-defined]
    done = context.offload.poll()
    states = [e for e in done if e.topic == "motion_state"]
    assert len(states) == 1 and states[0].body.particle == 5  # type: ignore[attr-defined]
    p = [getattr(states[0].body, f"p_{s}") for s in MOTION_STATES]
    assert math.isclose(sum(p), 1.0, abs_tol=1e-5)
    counts = stage.counters()
    assert counts["motion_windows_invalid"] == 4 and counts["motion_windows_done"] == 1
    assert counts["motion_inference_count"] == 1


def test_busy_service_skips_and_counts() -> None:
    class Busy(Offload):
        def submit(self, owner, fn, *args, on_done, on_fail, max_in_flight=None, block=False):  # type: ignore[no-untyped-def]
            return False  # every slot taken

    config = load_config(None)
    stage = MotionStage(config, MotionSettings())
    context = _context(config)
    stage.setup(context)
    object.__setattr__(context, "offload", Busy(ThreadBackend(1)))
    rng = np.random.default_rng(1)
    w = TrackWindow(9, 0, 49, 0, 0, (100 + rng.poisson(20, (50, 25, 25))).astype(np.float32), np.full((50, 2), 12.0))
    emissions = stage.process(Frame(seq=49, image=np.zeros((64, 64), np.uint16), t_acquired=0.0), Products(TrackWindows(49, (w,))))
    assert [e.body.reason for e in emissions] == ["busy"]  # type: ignore[attr-defined]
    assert stage.counters()["motion_windows_busy"] == 1


SWITCH_SCENE = {
    "n_particles": 1, "margin_nm": 0.0, "states": ["Stat", "Circ"],
    "dwell_ms": {"Stat": 4000.0, "Circ": 1.0e9}, "circ_speed_um_per_s": 10.0, "circ_radius_nm": [300.0, 400.0],
    "vesicle_diameter_nm": 200.0, "blink_on_mean_ms": 200.0, "blink_off_mean_ms": 100.0, "bleach_half_life_ms": 20000.0,
}


def test_analyze_publishes_states_and_the_change_near_the_true_switch(tmp_path: Path) -> None:
    """A simulated movie (switching on: Stat, then Circ at 100 nm/frame from frame 439 of seed 0)
    through ``analyze`` with the real stages; K = 200 windows side by side.

    The switch falls inside the window 400–599; the change is reported at that window or the next,
    so ``frame_change`` lies within one window (200 frames) of the true switch.
    """
    settings = {"simulation": SWITCH_SCENE, "stages": ["localize", "track", "motion"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(tmp_path / "c.yaml")
    movie, truth = simulate_stack(config, "widefield", n_frames=800, size_px=64, n_particles=1, seed=0)
    switch = int(truth["frame"][np.flatnonzero(truth["state"] != "Stat")[0]])
    assert truth["state"][0] == "Stat" and 400 < switch < 600
    tifffile.imwrite(tmp_path / "m.tif", movie)
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp_path / "m.tif"),
                          "--out", str(tmp_path / "res"), "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import csv

    with open(tmp_path / "res" / "motion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:10] == ["particle", "frame_start", "frame_end", "state", "probability",
                                  "p_Stat", "p_RanW", "p_RCir", "p_Circ", "p_Flow"]
    rows.sort(key=lambda r: int(r["frame_start"]))
    assert [int(r["frame_start"]) for r in rows] == [0, 200, 400, 600]
    states = [r["state"] for r in rows]
    assert states[0] == states[1] == "Stat" and states[3] == "Circ", states
    run = json.loads((tmp_path / "res" / "run.json").read_text())
    assert run["tables"]["motion.csv"] == 4


def test_live_run_publishes_motion_state_and_change(tmp_path: Path, make_config, daemons) -> None:  # type: ignore[no-untyped-def]
    """The daemon replaying the same switching movie: motion_state for each window, and one
    motion_change Stat -> Circ whose frame_change is within one window (200 frames) of the switch."""
    import threading

    from scopestream.daemon._service import Daemon
    from scopestream.daemon.client import Subscriber

    config0 = load_config(None, ["stages=[localize, track, motion]"])
    sim_config = load_config(None, ["stages=[localize, track]"], preset={"simulation": SWITCH_SCENE})
    movie, truth = simulate_stack(sim_config, "widefield", n_frames=800, size_px=64, n_particles=1, seed=0)
    switch = int(truth["frame"][np.flatnonzero(truth["state"] != "Stat")[0]])
    tifffile.imwrite(tmp_path / "m.tif", movie)
    assert config0.stages == ["localize", "track", "motion"]
    config = make_config("stages=[localize, track, motion]", "source.kind=file", f"source.file_path={tmp_path / 'm.tif'}",
                         "bus.policy=block", "events.wait_for_subscriber_s=20")
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint, ["motion_state", "motion_change", "motion_skipped", "run_stop", "welcome"])
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(20)
    starter.join(20)
    topics: dict[str, list] = {}
    while (m := sub.recv(60)) is not None:
        topics.setdefault(m.topic, []).append(m)
        if m.topic == "run_stop":
            break
    assert "run_stop" in topics
    states = sorted(topics.get("motion_state", []), key=lambda m: m.body["frame_start"])
    assert [m.body["frame_start"] for m in states] == [0, 200, 400, 600], topics.keys()
    body = states[0].body
    assert body["model_name"] == "motion" and body["model_version"] == _card()["version"]
    assert body["inference_ms"] > 0 and body["job_ms"] >= body["inference_ms"]
    changes = topics.get("motion_change", [])
    assert len(changes) == 1, [c.body for c in changes]
    change = changes[0].body
    assert change["from"] == "Stat" and change["to"] == "Circ"
    assert abs(change["frame_change"] - switch) <= 200
    assert "motion_skipped" not in topics
    # The inference-latency histogram, as cumulative buckets in the stage counters, over real HTTP.
    import urllib.request

    assert daemon.metrics_port is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith('scopestream_stage_counter{') and 'stage="motion"' in line:
            name = line.split('name="')[1].split('"')[0]
            values[name] = float(line.rsplit(" ", 1)[1])
    assert values["motion_inference_count"] == 4 == values["motion_windows_done"]
    assert values["motion_inference_le_1000ms"] == 4
    buckets = [values[k] for k in values if k.startswith("motion_inference_le_")]
    assert buckets == sorted(buckets)  # cumulative
    assert values["motion_changes"] == 1


def test_a_config_without_motion_imports_no_inference_runtime() -> None:
    code = (
        "import sys\n"
        "from scopestream.daemon._config import load_config\n"
        "from scopestream.daemon._stage import installed_stage_plugins\n"
        "config = load_config(None, ['stages=[frame_stats, localize, track]'])\n"
        "assert 'motion' in installed_stage_plugins()\n"
        "heavy = [m for m in ('onnxruntime', 'torch', 'tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--models", "sran", "--ship", "fused"], "--ship 'fused' is not among"),
    (["--models", "resnet"], "unknown model"),
    (["--k-frames", "200", "30"], "--k-frames"),
])
def test_train_cli_bad_input_exits_2_with_one_paragraph(tmp_path: Path, args: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "train", "motion", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
