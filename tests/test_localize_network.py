"""``localize.method: network``: the shipped weights on fresh simulated frames, ONNX Runtime against
torch, the stage in a real daemon on the simulated scanning camera, ``analyze`` on a file, and bad input.

Every frame here comes from seeds never used in training: ``scopestream train localize`` draws its
scenes from seeds ``s * 1_000_003 + i`` with s = 0 (training), 5 * 10**8 (validation) and 10**9
(test), i < 3000; the seeds below start at 3 * 10**12.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scopestream.daemon._config import ConfigError, ScopestreamConfig, load_config
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import Localizations, Products
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import Subscriber
from scopestream.models._backends import make_backend
from scopestream.models._card import load_model_folder
from scopestream.models.localize._train import match
from scopestream.plugins._gaussian_mle import fisher_crlb_px
from scopestream.plugins._loc_network import NetworkLocalizer, shipped_model_dir
from scopestream.plugins.localize import LocalizeSettings, LocalizeStage, locate
from scopestream.sim_camera._scanning import ScanningSimulator
from scopestream.sim_camera._settings import physics_from_config

sys.path.insert(0, str(Path(__file__).parent))
from spot_images import render_spots, to_adu  # noqa: E402

SEED0 = 3 * 10**12
SIGMA_WF = 1.3


def _net(camera: str, **settings: object) -> NetworkLocalizer:
    s = LocalizeSettings.model_validate({"method": "network", **settings})
    return NetworkLocalizer(s, ScopestreamConfig().camera, 1.0, shipped_model_dir(camera))


def _binomial_floor(p: float, n: int) -> float:
    """The smallest fraction of n Bernoulli(p) trials still consistent with p at 3 standard errors
    (normal approximation; a false failure has probability ~0.1 %)."""
    return p - 3.0 * math.sqrt(p * (1.0 - p) / n)


# -- shipped weights on fresh frames ---------------------------------------------------------------


def test_widefield_weights_find_and_localize_spots_at_the_bound() -> None:
    # 16 separated exact-Gaussian spots (sigma 1.3 px, N = 1000, b = 100: aperture SNR ~ 11) per
    # 64 x 64 frame, 20 frames = 320 spots = 640 axis errors.
    # Recall: the target is 0.98 (the card's test recall at SNR 10-20 is higher); the floor is its
    # binomial 3-SE bound at n = 320.
    # RMSE: the target is 1.1 x the Cramér-Rao bound (the N = 200 target; at N = 1000 the MLE
    # is at 1.0x). The squared RMSE of n = 640 roughly normal errors has a relative standard error of
    # sqrt(2 / n) (chi-square), the RMSE half that: the ceiling is 1.1 * (1 + 3 / sqrt(2 n)).
    # Uncertainty: std(error / predicted sigma) within [0.7, 1.4] (predicted sigma within 40 % of
    # the measured error; the sampling error of the std, 1 / sqrt(2 n) = 3 %, is small beside it).
    net = _net("widefield")
    rng = np.random.default_rng(SEED0)
    errs, zs, found, n_true, false_pos = [], [], 0, 0, 0
    for _ in range(20):
        gy, gx = np.meshgrid(np.arange(4) * 16 + 7.5, np.arange(4) * 16 + 7.5, indexing="ij")
        tx, ty = gx.ravel() + rng.uniform(-2, 2, 16), gy.ravel() + rng.uniform(-2, 2, 16)
        img = to_adu(rng, render_spots((64, 64), tx, ty, 1000.0, SIGMA_WF, 100.0))
        loc = net.localize(img)
        i, j = match(loc.x, loc.y, tx, ty, 1.5)
        found += len(i)
        n_true += 16
        false_pos += len(loc) - len(i)
        e = np.column_stack([loc.x[i] - tx[j], loc.y[i] - ty[j]])
        errs.append(e)
        zs.append(e / loc.uncertainty_px[i, None])
    e = np.concatenate(errs)
    recall = found / n_true
    assert recall >= _binomial_floor(0.98, n_true), recall
    assert false_pos / (found + false_pos) <= 1.0 - _binomial_floor(0.98, n_true)
    crlb = fisher_crlb_px(1000.0, 100.0, SIGMA_WF)
    rmse = float(np.sqrt(np.mean(e**2)))
    assert rmse / crlb <= 1.1 * (1.0 + 3.0 / math.sqrt(2 * e.size)), (rmse, crlb)
    assert 0.7 <= float(np.std(np.concatenate(zs))) <= 1.4


def _scanning_frames(d_um2_per_s: float, n: int, seed: int) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Netterstrøm's protocol: one QD per 24 x 25 px scanning image (see the benchmark)."""
    physics = physics_from_config(
        ScopestreamConfig(), frame_height_px=24, frame_width_px=25, n_particles=1, margin_nm=0.0,
        particle_kind="point", states=["RanW"], D_um2_per_s=d_um2_per_s, dwell_ms=1e9,
        photons_per_frame=1000.0, background_photons_per_px=5.0,
    )
    frames, truths = [], []
    for i in range(n):
        img, truth = ScanningSimulator(physics, seed=seed + i).next_frame()
        vis = truth[truth["visible"]]
        if len(vis) == 1:
            frames.append(img)
            truths.append((float(vis["x"][0]), float(vis["y"][0])))
    return frames, truths


def test_scanning_weights_find_the_trajectory_centroid_under_heavy_scan_blur() -> None:
    # D = 5 um^2/s (the benchmark's heaviest blur: the brightest pixel is ~1.5 px from the truth
    # at the median). Target: recall and precision 0.9 within eps = 2 px (the AUC target at
    # the largest D and middle eps); floors are the binomial 3-SE bounds at the test set's size.
    net = _net("scanning")
    frames, truths = _scanning_frames(5.0, 150, SEED0 + 10**6)
    assert len(frames) >= 100  # the rest lost their particle across the edge during the scan
    tp = fp = 0
    for img, (tx, ty) in zip(frames, truths, strict=True):
        loc = net.localize(img)
        hit = np.hypot(loc.x - tx, loc.y - ty) <= 2.0
        tp += int(hit.any())
        fp += len(loc) - int(hit.any())
    n = len(frames)
    assert tp / n >= _binomial_floor(0.9, n), (tp, n)
    assert tp / max(tp + fp, 1) >= _binomial_floor(0.9, n), (tp, fp)


# -- backends ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("camera", ["scanning", "widefield"])
def test_onnx_runtime_and_torch_agree(camera: str) -> None:
    pytest.importorskip("torch")
    folder = load_model_folder(shipped_model_dir(camera), name="localize", major_version=1)
    ort, torch_backend = make_backend("onnxruntime"), make_backend("torch")
    ort.load(folder)
    torch_backend.load(folder)
    rng = np.random.default_rng(SEED0 + 2)
    # A normalized noise frame with spots, of a size other than the export size (dynamic axes).
    x = np.arcsinh(rng.normal(0, 1, (2, 1, 40, 56)) + render_spots((40, 56), [10.3, 30.7], [12.2, 25.9], 80.0, 1.5, 0.0)[None, None])
    a, b = ort.run({"image": x.astype(np.float32)}), torch_backend.run({"image": x.astype(np.float32)})
    assert set(a) == set(b) == {"heat", "offset", "log_sigma"}
    for k in a:
        assert a[k].shape == b[k].shape
        # float32 arithmetic in a different order: agreement to ~1e-5 of the values' scale.
        np.testing.assert_allclose(a[k], b[k], atol=2e-4, rtol=1e-4, err_msg=k)


# -- the stage: default on the scanning camera, in a real daemon --------------------------------------


def test_scanning_camera_config_defaults_to_the_network(make_config: Callable[..., ScopestreamConfig]) -> None:
    assert make_config("source.mm_config=simulated-scanning").stage_settings("localize").method == "network"  # type: ignore[attr-defined]
    assert make_config("source.mm_config=simulated-scanning", "localize.method=mle").stage_settings("localize").method == "mle"  # type: ignore[attr-defined]
    assert make_config().stage_settings("localize").method == "mle"  # type: ignore[attr-defined]


def test_daemon_localizes_the_simulated_scanning_camera_with_the_network(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    config = make_config(
        "source.mm_config=simulated-scanning", "source.frames_limit=12", "stages=[localize]",
        "events.wait_for_subscriber_s=20", "simulation.frame_height_px=48", "simulation.frame_width_px=48",
        "simulation.n_particles=3", "simulation.particle_kind=point", "simulation.states=[RanW]",
        "simulation.D_um2_per_s=1.0", "simulation.photons_per_frame=2000", "simulation.margin_nm=0",
        "simulation.z_diffusion=false",
    )
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint, ["localizations", "stage_error", "run_stop"])
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(20)
    starter.join(20)
    msgs = []
    while (m := sub.recv(30)) is not None:
        msgs.append(m)
        if m.topic == "run_stop":
            break
    sub.close()
    locs = [m for m in msgs if m.topic == "localizations"]
    assert not [m for m in msgs if m.topic == "stage_error"]
    assert len(locs) == 12
    assert {m.body["method"] for m in locs} == {"network"}
    counts = np.array([m.body["count"] for m in locs])
    # Three bright in-focus particles (aperture SNR ~ 40) in a 48 x 48 px field with no margin: each
    # frame shows 3, unless two come within ~4 px (2 PSF sigma: one spot), which happens in ~7 %
    # of frames (3 pairs x pi 4^2 / 48^2). So at least 85 % of the 36 are found, and never more than
    # one spurious spot in a frame.
    assert counts.sum() >= 0.85 * 36 and counts.max() <= 4, counts
    for m in locs:
        x, y, u = m.arrays["x"], m.arrays["y"], m.arrays["uncertainty_px"]
        assert ((x >= -0.5) & (x < 47.5) & (y >= -0.5) & (y < 47.5)).all()
        assert (u > 0).all() and (u < 2).all()


def test_analyze_with_the_network_on_a_file_writes_the_same_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED0 + 3)
    stack = np.stack([to_adu(rng, render_spots((48, 52), [10.2, 30.6, 40.1], [12.4, 20.8, 35.3], 1500.0, SIGMA_WF, 20.0))
                      for _ in range(4)])
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    cols = {}
    for method in ("mle", "network"):
        out = subprocess.run(
            [sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp_path / "in.tif"), "--out",
             str(tmp_path / method), "--set", "stages=[localize]", "--set", f"localize.method={method}",
             "--set", f"localize.psf_sigma_px={SIGMA_WF}"],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])["frames_processed"] == 4
        lines = (tmp_path / method / "localizations.csv").read_text().splitlines()
        cols[method] = lines[0]
        rows = [dict(zip(lines[0].split(","), r.split(","), strict=True)) for r in lines[1:]]
        assert len(rows) == 12  # three spots in each of four frames
    assert cols["mle"] == cols["network"]


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_frames_give_a_clear_error_or_nothing() -> None:
    net = _net("widefield")
    # Empty (flat) frames: nothing found.
    assert len(net.localize(np.full((64, 64), 100, np.uint16))) == 0
    assert len(net.localize(np.zeros((64, 64), np.uint16))) == 0
    # Saturated: a fully saturated frame has no spot; a saturated spot is dropped and counted.
    assert len(net.localize(np.full((64, 64), 65535, np.uint16))) == 0
    rng = np.random.default_rng(SEED0 + 4)
    img = to_adu(rng, render_spots((64, 64), [15.3, 45.2], [20.1, 40.7], [2000.0, 2e6], SIGMA_WF, 50.0))
    loc = net.localize(img)
    assert loc.diagnostics["rejected_saturated"] >= 1  # the flat-topped blob may look like two spots
    assert len(loc) == 1 and abs(loc.x[0] - 15.3) < 0.5 and abs(loc.y[0] - 20.1) < 0.5
    # NaN: a NaN pixel near a spot drops that spot only; an all-NaN frame is a clear error.
    img = to_adu(rng, render_spots((64, 64), [15.3, 45.2], [20.1, 40.7], 2000.0, SIGMA_WF, 50.0)).astype(np.float32)
    img[41, 45] = np.nan
    loc = net.localize(img)
    assert len(loc) == 1 and abs(loc.x[0] - 15.3) < 0.5
    with pytest.raises(ValueError, match="no finite pixel"):
        net.localize(np.full((16, 16), np.nan, np.float32))
    # A frame whose size is not a multiple of the network's input multiple (4): padded, same answer.
    img = to_adu(rng, render_spots((37, 51), [10.4, 47.6], [8.7, 33.2], 2000.0, SIGMA_WF, 50.0))
    loc = net.localize(img)
    i, j = match(loc.x, loc.y, np.array([10.4, 47.6]), np.array([8.7, 33.2]), 0.5)
    assert len(i) == 2 and len(loc) == 2
    # Smaller than the network can read: a clear error.
    with pytest.raises(ValueError, match="smaller than"):
        net.localize(np.full((3, 40), 100, np.uint16))


def test_the_stage_reports_a_bad_frame_and_keeps_going() -> None:
    config = load_config(None, ["stages=[localize]", "localize.method=network", "localize.network_model=widefield"])
    stage = LocalizeStage(config, config.stage_settings("localize"))  # type: ignore[arg-type]
    stage._prepare_network()  # noqa: SLF001 - what setup() does, without a run context
    products = Products()
    with pytest.raises(ValueError, match="frame 7: no finite pixel"):
        stage.process(Frame(seq=7, image=np.full((32, 32), np.nan, np.float32), t_acquired=0.0), products)
    empty = products.get(Localizations)
    assert empty is not None and len(empty) == 0
    # The next frame is localized as usual (the engine counts the error as a stage_error and goes on).
    rng = np.random.default_rng(SEED0 + 5)
    good = to_adu(rng, render_spots((32, 32), [12.3], [17.8], 2000.0, SIGMA_WF, 50.0))
    products = Products()
    (emission,) = stage.process(Frame(seq=8, image=good, t_acquired=0.0), products)
    assert emission.body.method == "network" and emission.body.count == 1  # type: ignore[attr-defined]


def test_bad_settings_and_a_missing_model_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="localize.method"):
        load_config(None, ["localize.method=neural"])
    with pytest.raises(ConfigError, match="localize.network_threshold"):
        load_config(None, ["localize.network_threshold=0"])
    with pytest.raises(ValueError, match=f"no model card {tmp_path}"):
        locate(np.zeros((16, 16), np.uint16), method="network", network_model=str(tmp_path))


# -- training and the shipped folders -----------------------------------------------------------------


def test_tiny_training_run_learns_and_writes_a_loadable_model_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from scopestream.models.localize._train import TrainSettings, train_localize

    settings = TrainSettings(camera="widefield", out=tmp_path, train_frames=192, val_frames=32, test_frames=32,
                             epochs=4, batch_size=32, channels=4, progress=False, command="test")
    metrics = train_localize(settings, log=lambda _: None)
    loss = metrics["curves"]["train_loss"]
    # The focal loss of the initial heat map (prior 0.1 everywhere) plus the localization NLL
    # falls by far more than its batch-to-batch noise once the network learns where spots are.
    assert loss[-1] < loss[0] - 0.5, loss
    folder = load_model_folder(tmp_path / "model", name="localize", major_version=1)
    assert folder.card.training["command"] == "test" and folder.card.training["test_seed"] == 10**9
    assert {"recall", "precision", "rmse_px"} <= set(folder.card.test)
    for name in ("report.md", "metrics.json", "curves.png", "examples.png"):
        assert (tmp_path / name).is_file(), name


def test_dense_offset_targets_point_every_cell_near_a_particle_at_it() -> None:
    from scopestream.models.localize._inputs import decode, heat_targets

    # Two particles two cells apart (they share the neighbour cells between them) and one at an edge.
    x, y = np.array([5.2, 9.3, 0.4]), np.array([6.1, 6.3, 14.9])
    heat, off, mask = heat_targets(x, y, (16, 16), 2, dense_offsets=True)
    i, j = np.nonzero(mask)
    px, py = 2 * j + 0.5 + off[0, i, j], 2 * i + 0.5 + off[1, i, j]
    # Every supervised cell's centre + offset is exactly one of the particles, the nearest one
    # (its own cell keeps its particle), and the targets stay within the head's range (2 strides).
    d = np.hypot(px[:, None] - x[None], py[:, None] - y[None])
    assert np.allclose(d.min(axis=1), 0.0, atol=1e-5)
    cell_d = np.hypot(2 * j[:, None] + 0.5 - x[None], 2 * i[:, None] + 0.5 - y[None])
    assert np.all(d.argmin(axis=1) == cell_d.argmin(axis=1))
    assert np.abs(off).max() <= 4.0
    assert int((mask == 1).sum()) == 3 and int((mask > 0).sum()) == 3 + 8 + 8 - 3 + 3  # shared cells once; edge: 3 neighbours
    # Pooled decoding of the targets themselves gives the particles back.
    dec = decode(heat, off, np.zeros_like(off), 2, 0.5, 16, 16, 3, pool=True)
    assert np.allclose(np.sort(dec.x_px), np.sort(x), atol=1e-5)


@pytest.mark.parametrize("camera", ["scanning", "widefield"])
def test_shipped_model_folders_are_complete_and_small(camera: str) -> None:
    path = shipped_model_dir(camera)
    card = load_model_folder(path, name="localize", major_version=1).card
    assert card.input_spec["camera"] == camera
    for key in ("command", "seed", "commit", "train_frames", "test_frames", "test_seed", "time_s"):
        assert key in card.training, key
    assert sum(p.stat().st_size for p in path.iterdir()) <= 2 * 2**20
    assert (path / "MODEL_CARD.md").read_text().startswith("# Model card")


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--size", "30"], "--size must be a multiple of 4"),
    (["--nms-cells", "4"], "--nms-cells must be a positive odd number"),
    (["--heavy-blur-fraction", "1.5"], "--heavy-blur-fraction must be within [0, 1]"),
])
def test_train_cli_bad_input_exits_2_with_one_paragraph(tmp_path: Path, args: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "train", "localize", "--camera", "widefield",
                          "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_config_with_the_mle_imports_no_inference_runtime() -> None:
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from scopestream.daemon._config import load_config\n"
        "from scopestream.plugins.localize import locate\n"
        "config = load_config(None, ['stages=[frame_stats, localize, track]'])\n"
        "locate(np.full((32, 32), 100, np.uint16), config)\n"
        "heavy = [m for m in ('onnxruntime', 'torch', 'tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_analyze_with_a_missing_model_folder_exits_2_naming_it(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "in.tif", np.full((2, 16, 16), 100, np.uint16), photometric="minisblack")
    out = subprocess.run(
        [sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp_path / "in.tif"), "--out", str(tmp_path / "res"),
         "--set", "stages=[localize]", "--set", "localize.method=network", "--set", f"localize.network_model={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert f"no model card {tmp_path / 'nowhere'}" in out.stderr and "Traceback" not in out.stderr


def test_a_look_ahead_batch_gives_the_frame_by_frame_result() -> None:
    """When the daemon is behind, the network runs once on the waiting frames (LooksAhead); each
    frame's localizations are those of running it alone (to float32 rounding), a frame that cannot
    be batched (another size, all NaN) gets its own result or error, and nothing is kept after."""
    config = load_config(None, ["stages=[localize]", "localize.method=network", "localize.network_model=widefield",
                                "localize.network_batch_frames=8"])
    stage = LocalizeStage(config, config.stage_settings("localize"))  # type: ignore[arg-type]
    stage._prepare_network()  # noqa: SLF001 - what setup() does, without a run context
    assert stage.look_ahead_frames == 8
    rng = np.random.default_rng(SEED0 + 6)
    images = [to_adu(rng, render_spots((48, 48), rng.uniform(5, 43, 4), rng.uniform(5, 43, 4), 1500.0, SIGMA_WF, 30.0))
              for _ in range(5)]
    images.insert(2, to_adu(rng, render_spots((40, 48), [20.3], [18.6], 1500.0, SIGMA_WF, 30.0)))  # another size
    images.insert(4, np.full((48, 48), np.nan, np.float32))
    frames = [Frame(seq=100 + i, image=im, t_acquired=0.0) for i, im in enumerate(images)]
    alone: list[Localizations | None] = []
    for f in frames:
        try:
            alone.append(stage._network.localize(f.image, f.seq))  # noqa: SLF001
        except ValueError:
            alone.append(None)
    stage.look_ahead(frames)
    assert sorted(stage._ahead) == [100, 101, 103, 105, 106]  # noqa: SLF001 - the batchable ones
    for f, ref in zip(frames, alone, strict=True):
        products = Products()
        if ref is None:
            with pytest.raises(ValueError, match="no finite pixel"):
                stage.process(f, products)
            continue
        stage.process(f, products)
        got = products.get(Localizations)
        assert got is not None and len(got) == len(ref) and len(ref) >= 1
        np.testing.assert_allclose(np.c_[got.x, got.y, got.uncertainty_px], np.c_[ref.x, ref.y, ref.uncertainty_px],
                                   rtol=1e-4, atol=1e-4)
    assert not stage._ahead  # noqa: SLF001
    mle = LocalizeStage(config.model_copy(), LocalizeSettings())
    assert mle.look_ahead_frames == 1  # the MLE does not batch
