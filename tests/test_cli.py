"""The command line: exit codes, messages without tracebacks, analyze, and a clean SIGINT."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scopestream import __version__
from scopestream.daemon._cli import main
from scopestream.daemon.client import Subscriber


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"scopestream {__version__}"


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        ("optics:\n  pixel_size_nm: -3\n", ".yaml", "optics.pixel_size_nm: Input should be greater than 0 (given -3)"),
        ("stages: [frame_stats, nosuchstage]\n", ".yaml", "unknown stage(s) ['nosuchstage']; installed stages: ["),
        ("acquisition = { frame_interval_ms = 0 }\n", ".toml", "acquisition.frame_interval_ms"),
        ("optics: [1, 2\n", ".yaml", "is not valid YAML"),
        ("- 1\n- 2\n", ".yaml", "must hold a mapping"),
        ("nonsense_section:\n  a: 1\n", ".yaml", "unknown configuration section 'nonsense_section'"),
        ("camera:\n  gain_e_per_adu: 0.5\n  gainz: 2\n", ".yaml", "camera.gainz: unknown key"),
    ],
)
def test_bad_configuration_exits_2_with_a_named_key(tmp_path: Path, content: str, suffix: str, expected: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    out = run_cli("config", "--check", str(path))
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_print_default_round_trips_through_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--print-default"]) == 0
    text = capsys.readouterr().out
    for key in ("pixel_size_nm", "wavelength_nm", "offset_adu", "gain_e_per_adu", "read_noise_e", "exposure_ms",
                "frame_interval_ms", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557", "port: 9108"):
        assert key in text
    (tmp_path / "d.yaml").write_text(text)
    assert main(["config", "--check", str(tmp_path / "d.yaml"), "--set", "optics.na=1.2"]) == 0
    assert main(["config", "--check", str(tmp_path / "d.yaml"), "--set", "optics.na=7"]) == 2


def test_analyze_processes_every_frame_and_writes_tables(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    stack = rng.poisson(300, size=(25, 40, 48)).astype(np.uint16)
    stack[7, 3, 4] = 65535  # one saturated pixel in frame 7
    tifffile.imwrite(tmp_path / "in.tif", stack)
    out = run_cli("analyze", str(tmp_path / "in.tif"), "--out", str(tmp_path / "res"), "--set", "stages=[frame_stats]")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "res" / "run.json").read_text())
    assert summary["frames_received"] == summary["frames_processed"] == 25 and summary["frames_dropped"] == 0
    with open(tmp_path / "res" / "frame_stats.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["frame"]) for r in rows] == list(range(25))
    np.testing.assert_allclose([float(r["mean_adu"]) for r in rows], stack.mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_array_equal([float(r["max_adu"]) for r in rows], stack.max(axis=(1, 2)))
    assert float(rows[7]["saturated_fraction"]) == pytest.approx(1 / (40 * 48))
    assert float(rows[6]["saturated_fraction"]) == 0.0


def test_analyze_writes_every_musical_window_as_an_image_the_readers_place(tmp_path: Path) -> None:
    # 60 frames, full-field windows of 20 frames every 20 frames: exactly 3 windows, none skipped
    # (analyze waits for the off-thread service rather than skipping), each written as a TIFF whose
    # description places it; the batch MUSICAL of the same frames is the reference image.
    from scopestream.daemon._report import load_results, musical_files
    from scopestream.plugins.musical import musical_image

    rng = np.random.default_rng(5)
    stack = rng.poisson(200, size=(60, 24, 26)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", stack)
    out = run_cli("analyze", str(tmp_path / "in.tif"), "--out", str(tmp_path / "res"), "--set", "stages=[musical]",
                  "--set", "musical.window_frames=20", "--set", "musical.full_field_every_frames=20",
                  "--set", "musical.full_field_subpixels=2", "--set", "musical.threshold=-1",
                  "--set", "offload.backend=threads")
    assert out.returncode == 0, out.stderr
    files = musical_files(tmp_path / "res")
    assert [f.name for f in files] == ["full_field_field_0-19.tif", "full_field_field_20-39.tif", "full_field_field_40-59.tif"]
    images = load_results(tmp_path / "res").musical
    assert [(m.frame_start, m.frame_end, m.subpixels, m.x0_px, m.y0_px) for m in images] == [
        (0, 19, 2, 0.0, 0.0), (20, 39, 2, 0.0, 0.0), (40, 59, 2, 0.0, 0.0)]
    scale = float(stack[:20].max())  # the live stage normalizes every window by the first window's max
    expected = musical_image(stack[20:40], scale=scale, subpixels=2, threshold=-1.0, wavelength_nm=510.0, na=1.4,
                             pixel_size_nm=100.0).image
    np.testing.assert_allclose(images[1].image, expected, rtol=1e-4, atol=1e-6 * float(np.abs(expected).max()))


def test_analyze_refuses_a_file_that_is_not_a_tiff(tmp_path: Path) -> None:
    (tmp_path / "x.tif").write_bytes(b"this is not a tiff")
    out = run_cli("analyze", str(tmp_path / "x.tif"), "--out", str(tmp_path / "res"))
    assert out.returncode == 2 and "not a readable TIFF" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("analyze", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "res"))
    assert out.returncode == 2 and "no such file" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    pytest.importorskip("mm_test_adapters")
    ev, ctl, met = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "UNICORE_SEQUENCE_BUFFER_MB": "64"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scopestream.daemon._cli", "run", "--set", "source.mm_config=demo",
         "--set", "stages=[frame_stats]", "--set", "acquisition.exposure_ms=5", "--set", "acquisition.frame_interval_ms=5",
         "--set", f"events.endpoint=tcp://127.0.0.1:{ev}", "--set", f"control.endpoint=tcp://127.0.0.1:{ctl}",
         "--set", f"metrics.port={met}", "--set", "events.wait_for_subscriber_s=30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        with Subscriber(f"tcp://127.0.0.1:{ev}", ["run_start", "run_stop", "frame_stats"]) as sub:
            assert sub.wait_ready(30), "the daemon did not come up"
            first = sub.recv(30)
            assert first is not None and first.topic == "run_start"
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            stop = None
            n_stats = 0
            while (m := sub.recv(20)) is not None:
                if m.topic == "frame_stats":
                    n_stats += 1
                if m.topic == "run_stop":
                    stop = m
                    break
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stop is not None
    assert stop.body["reason"] == "SIGINT received"
    assert stop.body["exit_status"] == "aborted"  # the schema's word for a run ended by a signal
    assert stop.body["frames_received"] == stop.body["frames_processed"] + stop.body["frames_dropped"]
    assert n_stats == stop.body["frames_processed"] > 0


# -- start-up cost: what --version and config --check import ----------------------------------

_HEAVY = ("torch", "scopestream.sim_camera", "scipy.stats")
_SIMULATORS = ("scopestream.sim_camera._widefield", "scopestream.sim_camera._scanning",
               "scopestream.sim_camera._scene", "scopestream.sim_camera._noise", "scipy.stats", "torch")


def _imported_after(args: list[str], modules: tuple[str, ...]) -> tuple[int, list[str], str]:
    """Run the command line in a fresh interpreter; return its status and which of ``modules`` it imported."""
    script = (
        "import json, sys\n"
        "from scopestream.daemon._cli import main\n"
        "try:\n"
        f"    rc = main({args!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        f"print('IMPORTED', json.dumps([m for m in {modules!r} if m in sys.modules]))\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    line = next(x for x in out.stdout.splitlines() if x.startswith("IMPORTED "))
    return out.returncode, json.loads(line.removeprefix("IMPORTED ")), out.stderr


def test_version_imports_neither_torch_nor_the_simulators() -> None:
    rc, imported, err = _imported_after(["--version"], (*_HEAVY, "pydantic", "numpy", "scopestream.daemon._config"))
    assert rc == 0, err
    assert imported == [], f"--version imported {imported}"


def test_config_check_imports_neither_torch_nor_the_simulators(tmp_path: Path) -> None:
    path = tmp_path / "file_source.yaml"
    path.write_text(f"source:\n  kind: file\n  file_path: {tmp_path / 'x.tif'}\n")
    rc, imported, err = _imported_after(["config", "--check", str(path)], _HEAVY)
    assert rc == 0, err
    assert imported == [], f"config --check imported {imported}"
    # The embedded default (a simulated camera): its settings model is imported to validate the
    # simulation section, the simulators themselves are not.
    default = tmp_path / "default.yaml"
    default.write_text("{}\n")
    rc, imported, err = _imported_after(["config", "--check", str(default)], _SIMULATORS)
    assert rc == 0, err
    assert imported == [], f"config --check imported {imported}"


# -- exit 2 with one paragraph, never a traceback ----------------------------------------------

def _assert_refused(out: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    message = [line for line in out.stderr.splitlines() if line.startswith("scopestream: error:")]
    assert len(message) == 1, out.stderr[-2000:]
    for text in expected:
        assert text in message[0], message[0]


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)), "is not a text file"),
    (b"acquisition:\n  exposure_ms: .inf\n", "acquisition.exposure_ms: Input should be a finite number"),
    (b"track:\n  max_displacement_px: 1e308\n", "track.max_displacement_px: Input should be less than or equal to 1000"),
    (b"optics:\n  na: true\n", "optics.na: Input should be a valid number (given True)"),
    (b"bus:\n  capacity_frames: 100000000000\n", "bus.capacity_frames"),
    (b"musical:\n  threshold: .nan\n", "musical.threshold: Input should be a finite number"),
])
def test_bad_files_exit_2_without_a_traceback(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    _assert_refused(run_cli("config", "--check", str(path)), expected)


def test_yaml_alias_bomb_under_simulation_is_refused_at_once(tmp_path: Path) -> None:
    lines = ["simulation:", '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    # today: 90 s and 2.7 GB, then MemoryError; the timeout is a hang guard, not a benchmark
    _assert_refused(run_cli("config", "--check", str(path), timeout=60), "alias bomb")
    _assert_refused(run_cli("run", "--config", str(path), timeout=60), "alias bomb")


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "--set", "musical.region_px=4"], "musical: region_px (4) is smaller than the MUSICAL PSF window"),
    (["config", "--check", "-", "--set", "musical.region_px=4"], "region_px (4)"),
    (["run", "--set", "acquisition.exposure_ms=.inf"], "acquisition.exposure_ms"),
    (["run", "--set", "bus.capacity_frames=1e11"], "bus.capacity_frames"),
    (["run", "--set", "source.poll_interval_ms=1e9"], "source.poll_interval_ms: Input should be less than or equal to 1000"),
    (["run", "--set", "localize.min_separation_px=.inf"], "localize.min_separation_px"),
    (["run", "--set", "simulation.n_particles=true"], "simulation.n_particles"),
])
def test_bad_settings_exit_2_without_a_traceback(tmp_path: Path, args: list[str], expected: str) -> None:
    if "-" in args:
        (tmp_path / "empty.yaml").write_text("{}\n")
        args = [str(tmp_path / "empty.yaml") if a == "-" else a for a in args]
    _assert_refused(run_cli(*args), expected)


def test_simulate_refuses_before_allocating(tmp_path: Path) -> None:
    out, truth = str(tmp_path / "m.tif"), str(tmp_path / "t.csv")
    # 1e9 frames of 64x64 (7.6 TiB): refused by the bound, nothing written
    _assert_refused(run_cli("simulate", "widefield", "--frames", "1000000000", "--out", out, "--truth", truth),
                    "--frames must be between 1 and")
    # within the bound but beyond the free disk space: 2e6 frames of 8192x8192 px = 244 TiB
    _assert_refused(run_cli("simulate", "widefield", "--frames", "2000000", "--size", "8192", "--out", out, "--truth", truth),
                    "free", "TiB")
    for setting in ("simulation.photons_per_frame=1e300", "simulation.D_um2_per_s=1e300"):
        _assert_refused(run_cli("simulate", "widefield", "--frames", "3", "--out", out, "--truth", truth, "--set", setting),
                        setting.split("=")[0])
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--subpixels", "1000"], "--subpixels must be between 1 and 64"),
    (["--wavelength-nm", "1e9"], "--wavelength-nm"),
    (["--na", "nan"], "--na"),
    (["--device", "bogus"], "--device 'bogus'"),
    (["--backend", "torch", "--device", "bogus"], "--"),
])
def test_musical_arguments_are_checked_before_any_work(tmp_path: Path, args: list[str], expected: str) -> None:
    stack = np.random.default_rng(0).poisson(100, size=(20, 12, 12)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    _assert_refused(run_cli("musical", str(tmp_path / "s.tif"), "--out", str(tmp_path / "o.tif"), *args), expected)


# -- signals during start-up -------------------------------------------------------------------

def _handlers_installed(pid: int, timeout_s: float = 30) -> bool:
    """Wait until the process catches SIGTERM (Python leaves it at the default until main installs ours)."""
    deadline = time.monotonic() + timeout_s
    status = Path(f"/proc/{pid}/status")
    while time.monotonic() < deadline:
        try:
            caught = next(int(x.split()[1], 16) for x in status.read_text().splitlines() if x.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False
        if caught & (1 << (signal.SIGTERM - 1)):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to see when the handlers are in")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_ends_the_run_as_aborted(signum: signal.Signals) -> None:
    ev, ctl = _free_port(), _free_port()
    env = {**os.environ, "UNICORE_SEQUENCE_BUFFER_MB": "64"}
    with Subscriber(f"tcp://127.0.0.1:{ev}", ["welcome", "run_start", "run_stop"]) as sub:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scopestream.daemon._cli", "run", "--set", "stages=[frame_stats]",
             "--set", "simulation.frame_height_px=64", "--set", "simulation.frame_width_px=64",
             "--set", f"events.endpoint=tcp://127.0.0.1:{ev}", "--set", f"control.endpoint=tcp://127.0.0.1:{ctl}",
             "--set", "metrics.enabled=false", "--set", "events.wait_for_subscriber_s=20"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            assert _handlers_installed(proc.pid), "the handlers never came"
            # Now: main has just begun; the configuration, the simulators and the camera are
            # still being loaded (about a second), the daemon does not exist yet.
            proc.send_signal(signum)
            messages = []
            while (m := sub.recv(30)) is not None:
                if m.topic != "welcome":
                    messages.append(m)
                if m.topic == "run_stop":
                    break
            rc = proc.wait(30)
            stderr = proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert [m.topic for m in messages] == ["run_start", "run_stop"], [m.topic for m in messages]
    stop = messages[-1].body
    assert stop["exit_status"] == "aborted" and stop["reason"] == f"{signum.name} received"
    assert stop["frames_received"] == stop["frames_processed"] + stop["frames_dropped"]


# -- pymmcore-plus's installation message ------------------------------------------------------

def _fresh_machine_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line as on a machine without mm-test-adapters or a Micro-Manager install."""
    script = (
        "import sys\n"
        "sys.modules['mm_test_adapters'] = None  # not installed\n"
        "from scopestream.daemon._cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    env = {**os.environ, "UNICORE_SEQUENCE_BUFFER_MB": "64", "XDG_DATA_HOME": str(tmp_path / "data"),
           "HOME": str(tmp_path)}
    env.pop("MICROMANAGER_PATH", None)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)


def test_simulated_camera_run_says_nothing_about_micromanager(tmp_path: Path) -> None:
    out = _fresh_machine_cli(
        tmp_path, "run", "--set", "stages=[frame_stats]", "--set", "source.frames_limit=5",
        "--set", "simulation.frame_height_px=32", "--set", "simulation.frame_width_px=32",
        "--set", "events.endpoint=tcp://127.0.0.1:0", "--set", "control.endpoint=tcp://127.0.0.1:0",
        "--set", "metrics.enabled=false",
    )
    assert out.returncode == 0, out.stderr
    assert "run" in out.stderr and "5 frames received" in out.stderr, out.stderr
    assert "Micro-Manager" not in out.stderr and "mmcore install" not in out.stderr, out.stderr


def test_a_configuration_with_cpp_adapters_says_what_to_install(tmp_path: Path) -> None:
    cfg = tmp_path / "demo.cfg"
    cfg.write_text("Device,Camera,DemoCamera,DCam\nProperty,Core,Initialize,1\nProperty,Core,Camera,Camera\n")
    out = _fresh_machine_cli(
        tmp_path, "run", "--set", f"source.mm_config={cfg}", "--set", "stages=[frame_stats]",
        "--set", "events.endpoint=tcp://127.0.0.1:0", "--set", "control.endpoint=tcp://127.0.0.1:0",
        "--set", "metrics.enabled=false",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "pip install 'scopestream[demo]'" in out.stderr and "mmcore install" in out.stderr, out.stderr
    assert "Could not find a compatible Micro-Manager installation" not in out.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to see when the handlers are in")
def test_sigterm_ends_other_commands_with_a_message_not_a_traceback() -> None:
    # `listen` on an endpoint where nobody publishes waits for ever; SIGTERM ends it with 128 + 15.
    proc = subprocess.Popen([sys.executable, "-m", "scopestream.daemon._cli", "listen", "--endpoint",
                             f"tcp://127.0.0.1:{_free_port()}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _handlers_installed(proc.pid)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + signal.SIGTERM, stderr
    assert "scopestream: interrupted by SIGTERM" in stderr and "Traceback" not in stderr
