"""The image-stack diffusion network (issue 13, part 3): shipped weights against simulated truth,
ONNX Runtime against torch, the rotation average, a real daemon run with ``diffusion.method:
network``, and the configuration errors."""

from __future__ import annotations

import json
import math
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scopestream.daemon._config import ScopestreamConfig, load_config
from scopestream.daemon._offload import Offload, ThreadBackend
from scopestream.daemon._sources import SourceDescription
from scopestream.daemon._stage import RunContext
from scopestream.models._backends import ModelRef
from scopestream.models._card import ModelLoadError, load_model_folder
from scopestream.models.diffusion._data import DataSettings, StackSet, render_mosaic
from scopestream.models.diffusion._inputs import StackSpec, stack_input
from scopestream.plugins._diffusion_mle import METHOD_LABELS
from scopestream.plugins._diffusion_network import default_model_dir, estimate_stacks, load_network
from scopestream.plugins.diffusion import WINDOW_LABELS, DiffusionStage

SHIPPED = default_model_dir()
FRESH_SEED = 3 * 10**9  # neither the training (0) nor the report's test seed (10**9) nor the benchmark's (2·10**9)


def _card() -> dict:
    return json.loads((SHIPPED / "card.json").read_text())


def _fresh(blur: float, mosaics: int = 2) -> StackSet:
    spec, data = StackSpec(), DataSettings()
    return StackSet.concatenate([render_mosaic(FRESH_SEED + int(blur > 0), i, blur, spec, data) for i in range(mosaics)])


@pytest.fixture(scope="module")
def onnx_model() -> tuple:
    return load_network(ModelRef(str(SHIPPED), "onnxruntime", "cpu", 1))


@pytest.mark.parametrize("blur", [1.0 / 6.0, 0.0])
def test_shipped_weights_meet_their_held_out_figures_on_fresh_stacks(blur: float, onnx_model: tuple) -> None:
    """RMSE of ln D on ~500 fresh stacks against the card's held-out test RMSE at this R.

    Bound: the fresh mean squared error m = mean(e²) estimates the same MSE as the card's
    (n0 held-out stacks); its standard error is sqrt(var(e²) / n) (measured here, heavy tails
    included) and the card's is about MSE · sqrt(2 / n0). We require m <= MSE_card + 4 combined
    SE (a one-sided 4-sigma bound: a false failure about once in 30 000 runs). The predicted
    variance must be calibrated to within the same statistics: mean z² in 1 ± 4 SE(z²) + 0.25
    (the 0.25 allows the calibration error the card reports at training; see MODEL_CARD.md).
    """
    _, backend = onnx_model
    ds = _fresh(blur)
    n = len(ds)
    assert n > 400
    out = backend.run({"stack": stack_input(ds.pixels), "blur": np.full((n, 1), blur, np.float32)})
    e = out["log_D"][:, 0].astype(np.float64) - ds.log_D
    var = np.exp(out["log_var"][:, 0].astype(np.float64))
    card = _card()["test"][f"R={blur:.3f}"]
    mse_card, n0 = card["rmse_logD"] ** 2, card["n"]
    m = float(np.mean(e**2))
    se = math.sqrt(float(np.var(e**2)) / n + mse_card**2 * 2.0 / n0)
    assert m <= mse_card + 4 * se, (math.sqrt(m), card["rmse_logD"])
    # The network's RMSE over three decades of D stays below the CVE's on 15 steps (~0.58 at
    # R = 1/6, 0.86 at R = 0 in bench_diffusion_network.py): a floor for any useful model.
    assert math.sqrt(m) < 0.58
    z2 = e**2 / var
    assert abs(float(np.mean(z2)) - 1.0) <= 4 * math.sqrt(float(np.var(z2)) / n) + 0.25, float(np.mean(z2))


def test_onnx_runtime_and_torch_agree(onnx_model: tuple) -> None:
    """The exported graph (rotation average included) and the torch network rebuilt from the
    registry give the same mean and log-variance to float32 rounding (1e-4 on ln D)."""
    pytest.importorskip("torch")
    from scopestream.models._backends import TorchBackend

    folder, ort = onnx_model
    torch_backend = TorchBackend(threads=1)
    torch_backend.load(folder)
    ds = _fresh(1.0 / 6.0, mosaics=1)
    x = stack_input(ds.pixels[:64])
    b = np.full((64, 1), 1 / 6, np.float32)
    a, t = ort.run({"stack": x, "blur": b}), torch_backend.run({"stack": x, "blur": b})
    for name in ("log_D", "log_var"):
        np.testing.assert_allclose(a[name], t[name], atol=1e-4, rtol=1e-4)


def test_the_rotation_average_is_invariant_to_rotating_the_input(onnx_model: tuple) -> None:
    """Rotating every stack by 90°, 180°, 270° (and the rotation average's own set is the same
    four images) leaves the output unchanged to float32 summation order (1e-5)."""
    _, backend = onnx_model
    x = stack_input(_fresh(0.0, mosaics=1).pixels[:32])
    b = np.zeros((32, 1), np.float32)
    ref = backend.run({"stack": x, "blur": b})
    for k in (1, 2, 3):
        rot = backend.run({"stack": np.ascontiguousarray(np.rot90(x, k, axes=(2, 3))), "blur": b})
        for name in ("log_D", "log_var"):
            np.testing.assert_allclose(rot[name], ref[name], atol=1e-5)
    # ... whereas one orientation of the network alone is not invariant (the average does something).
    pytest.importorskip("torch")
    import torch

    from scopestream.models._registry import create_model

    folder, _ = load_network(ModelRef(str(SHIPPED), "onnxruntime", "cpu", 1))
    net = create_model("stack_cnn", **folder.card.architecture_config)
    net.load_state_dict(torch.load(folder.file("torch"), weights_only=True))
    with torch.inference_mode():
        m0 = net.eval().forward_single(torch.from_numpy(x), torch.from_numpy(b))[0]
        m1 = net.forward_single(torch.from_numpy(np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))), torch.from_numpy(b))[0]
    assert float((m0 - m1).abs().max()) > 1e-4


def test_estimate_stacks_names_a_bad_window() -> None:
    ref = ModelRef(str(SHIPPED), "onnxruntime", "cpu", 1)
    with pytest.raises(ValueError, match="shape"):
        estimate_stacks(ref, [np.zeros((8, 16, 16), np.float32)], 0.0)
    bad = np.zeros((16, 16, 16), np.float32)
    bad[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        estimate_stacks(ref, [bad], 0.0)


def _context(config: ScopestreamConfig) -> RunContext:
    return RunContext(
        frame_shape_px=(64, 64), dtype=np.dtype(np.uint16), pixel_size_nm=config.optics.pixel_size_nm,
        frame_interval_ms=10.0, exposure_ms=10.0, camera=config.camera, optics=config.optics,
        source=SourceDescription(kind="file", detail="test", width_px=64, height_px=64, dtype="uint16", mode="replay"),
        offload=Offload(ThreadBackend(1), max_in_flight_jobs=8),
    )


def _setup_error(tmp_path: Path, *overrides: str) -> str:
    config = load_config(None, ["diffusion.method=network", *overrides])
    stage = DiffusionStage(config, config.stage_settings("diffusion"))  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        stage.setup(_context(config))
    return str(info.value)


def test_network_without_usable_weights_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing folder, a folder without weights, another model's folder, another major version,
    other optics, and no onnxruntime: each a ValueError naming the folder and the problem."""
    message = _setup_error(tmp_path, f"diffusion.network_model_dir={tmp_path / 'nowhere'}")
    assert "network" in message and "nowhere" in message and "no model card" in message
    empty = tmp_path / "no_weights"
    shutil.copytree(SHIPPED, empty)
    (empty / "model.onnx").unlink()
    assert "is missing" in _setup_error(tmp_path, f"diffusion.network_model_dir={empty}")
    motion = SHIPPED.parent / "motion"
    assert "holds model 'motion'" in _setup_error(tmp_path, f"diffusion.network_model_dir={motion}")
    v2 = tmp_path / "v2"
    shutil.copytree(SHIPPED, v2)
    card = _card()
    card["version"] = "2.0.0"
    (v2 / "card.json").write_text(json.dumps(card))
    assert "major version 2" in _setup_error(tmp_path, f"diffusion.network_model_dir={v2}")
    assert "PSF SD" in _setup_error(tmp_path, "localize.psf_sigma_px=1.5")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    assert "onnxruntime is not importable" in _setup_error(tmp_path, "diffusion.network_threads=3")
    with pytest.raises(ModelLoadError, match="shape"):
        load_model_folder(SHIPPED, name="diffusion", major_version=1, inputs={"stack": [-1, 16, 15, 15]})


def test_network_settings_are_validated() -> None:
    from scopestream.daemon._config import ConfigError

    with pytest.raises(ConfigError, match="network_step_frames"):
        load_config(None, ["diffusion.method=network", "diffusion.network_step_frames=0"])
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["diffusion.method=neural"])


SCENE = {"particle_kind": "point", "states": ["RanW"], "D_um2_per_s": 0.1, "blink_off_mean_ms": 0.0,
         "photons_per_frame": 1500.0, "background_photons_per_px": 10.0, "margin_nm": 0.0,
         "substeps_per_exposure": 16}


def test_daemon_run_publishes_network_estimates_beside_the_mle(tmp_path: Path, make_config, daemons) -> None:  # type: ignore[no-untyped-def]
    """A real daemon (real ZeroMQ) replaying a simulated movie of 4 Brownian emitters (D = 0.1
    µm²/s, 64 frames) with diffusion.method=network: 'diffusion' messages carry rows with method
    'network' and window 'stack' (one per 16-frame window of each track) and, beside them, the
    track-based rows (MLE or CVE by the 'auto' rule); the network rows estimate D within the
    statistics: the median |ln D_net - ln D| over the rows < 0.8 (the network's RMSE at this D is
    about 0.3-0.45, and the median absolute error of a normal is 0.67 SD; 0.8 leaves room for the
    few rows and for windows cut around tracks the tracker broke)."""
    from scopestream.daemon._service import Daemon
    from scopestream.daemon.client import Subscriber
    from scopestream.sim_camera import simulate_stack

    sim_config = load_config(None, ["stages=[localize, track]"], preset={"simulation": SCENE})
    movie, truth = simulate_stack(sim_config, "widefield", n_frames=64, size_px=64, n_particles=4, seed=5)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    config = make_config("stages=[localize, track, diffusion]", "source.kind=file", f"source.file_path={tmp_path / 'm.tif'}",
                         "bus.policy=block", "events.wait_for_subscriber_s=20", "diffusion.method=network",
                         "diffusion.network_skip_when_busy=false")
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint, ["diffusion", "run_stop", "welcome"])
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(20)
    starter.join(20)
    rows: dict[str, list[np.ndarray]] = {}
    while (m := sub.recv(60)) is not None:
        if m.topic == "run_stop":
            break
        if m.topic == "diffusion":
            assert m.body["method"] == "network"
            assert m.body["labels"]["method"] == list(METHOD_LABELS) and m.body["labels"]["window"] == list(WINDOW_LABELS)
            for name, arr in m.arrays.items():
                rows.setdefault(name, []).append(np.asarray(arr))
    cols = {k: np.concatenate(v) for k, v in rows.items()}
    method = np.asarray(METHOD_LABELS)[cols["method"]]
    window = np.asarray(WINDOW_LABELS)[cols["window"]]
    net = method == "network"
    assert net.sum() >= 8, method
    assert (window[net] == "stack").all() and np.all(cols["frame_end"][net] - cols["frame_start"][net] == 15)
    track_rows = ~net & (window == "track")
    assert track_rows.any() and set(method[track_rows]) <= {"mle", "mle_scaled", "mle_joint", "cve"}
    assert np.intersect1d(cols["particle"][net], cols["particle"][track_rows]).size >= 2
    d_net = cols["D_um2_per_s"][net]
    assert np.all(d_net > 0) and np.all(cols["D_err_um2_per_s"][net] > 0) and np.isnan(cols["D_crlb_um2_per_s"][net]).all()
    assert float(np.median(np.abs(np.log(d_net / 0.1)))) < 0.8, d_net


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--train-mosaics", "0"], "--train-mosaics must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
])
def test_train_cli_bad_input_exits_2_with_one_paragraph(tmp_path: Path, args: list[str], message: str) -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "train", "diffusion", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_train_writes_a_loadable_model_folder_and_report(tmp_path: Path) -> None:
    """A tiny run of `scopestream train diffusion` (1 training mosaic, 1 epoch): the model folder
    loads and checks (card, hashes, input shapes), the ONNX graph runs, the card and
    MODEL_CARD.md carry command, seed, commit, data sizes, time and the held-out test figures."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import subprocess

    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "train", "diffusion", "--out", str(tmp_path),
                          "--train-mosaics", "1", "--test-mosaics", "1", "--epochs", "1", "--seed", "7", "--no-progress"],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    folder = load_model_folder(tmp_path / "model", name="diffusion", major_version=1, inputs={"stack": [-1, 16, 16, 16], "blur": [-1, 1]})
    t = folder.card.training
    assert t["seed"] == 7 and t["test_seed"] == 10**9 + 7 and t["train_stacks"] > 100 and t["time_s"] > 0
    assert "train diffusion" in t["command"] and t["commit"]
    assert set(folder.card.test) == {"R=0.167", "R=0.000", "all"}
    md = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    assert "never used in training" in md and "| R | D bin" in md
    assert (tmp_path / "report.md").is_file() and (tmp_path / "curves.png").is_file() and (tmp_path / "test.png").is_file()
    assert (tmp_path / "model" / "curves.png").is_file() and (tmp_path / "model" / "test.png").is_file()
    _, backend = load_network(ModelRef(str(tmp_path / "model"), "onnxruntime", "cpu", 1))
    res = backend.run({"stack": np.zeros((2, 16, 16, 16), np.float32), "blur": np.zeros((2, 1), np.float32)})
    assert res["log_D"].shape == (2, 1) and np.isfinite(res["log_var"]).all()


def test_analyze_writes_network_rows_to_diffusion_csv(tmp_path: Path) -> None:
    """`scopestream analyze --set diffusion.method=network`: diffusion.csv keeps its columns and
    holds rows with method 'network' / window 'stack' beside the track rows (method by 'auto')."""
    import csv
    import subprocess

    from scopestream.sim_camera import simulate_stack

    sim_config = load_config(None, ["stages=[localize, track]"], preset={"simulation": SCENE})
    movie, _ = simulate_stack(sim_config, "widefield", n_frames=48, size_px=48, n_particles=3, seed=11)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp_path / "m.tif"), "--out",
                          str(tmp_path / "res"), "--set", "stages=[localize, track, diffusion]", "--set", "diffusion.method=network"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "res" / "diffusion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:11] == ["frame", "particle", "frame_start", "frame_end", "n_steps", "D_um2_per_s", "D_err_um2_per_s",
                                  "D_crlb_um2_per_s", "sigma_loc_nm", "method", "window"]
    net = [r for r in rows if r["method"] == "network"]
    assert len(net) >= 4 and {r["window"] for r in net} == {"stack"}
    assert {r["method"] for r in rows if r["window"] == "track"} <= {"mle", "mle_scaled", "mle_joint", "cve"}
    assert all(float(r["D_um2_per_s"]) > 0 for r in net)


def test_a_model_loaded_for_one_family_is_not_handed_to_another() -> None:
    """Models are loaded once per process (models._backends.load_once); the cache is keyed by the
    family's checks too, so the motion folder, once loaded by the motion stage, is still refused
    as a diffusion network."""
    from scopestream.plugins.motion import _model as motion_model

    ref = ModelRef(str(SHIPPED.parent / "motion"), "onnxruntime", "cpu", 1)
    folder, _ = motion_model(ref)
    assert folder.card.name == "motion"
    with pytest.raises(ModelLoadError, match="holds model 'motion'"):
        load_network(ref)
