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
    assert stop.body["frames_received"] == stop.body["frames_processed"] + stop.body["frames_dropped"]
    assert n_stats == stop.body["frames_processed"] > 0
