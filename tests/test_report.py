"""``scopestream report``: the HTML report of an analyzed simulated movie, rendered in headless
Chromium (screenshot not blank, every section heading there, every embedded image decodes), and
the numbers behind the plots against exact values."""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

pytest.importorskip("matplotlib", reason="the report needs the 'report' extra (matplotlib)")

from PIL import Image  # noqa: E402 - matplotlib brings pillow

from scopestream.daemon._cli import main  # noqa: E402
from scopestream.daemon._config import load_config  # noqa: E402
from scopestream.daemon._report import (  # noqa: E402
    SECTIONS,
    read_table,
    render_report,
    time_averaged_msd,
    transition_counts,
)
from scopestream.sim_camera import simulate_stack  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
)

SCENE = {
    "particle_kind": "point",
    "states": ["RanW", "Stat", "Flow"],
    "dwell_ms": 150.0,  # ~15 frames: every particle switches state a few times in 80 frames
    "D_um2_per_s": 0.05,
    "photons_per_frame": 3000,
    "background_photons_per_px": 10,
}

# Appended to a copy of the report: after load, write into the DOM how many <img> Chromium decoded.
_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
  const p = document.createElement('p'); p.id = 'probe';
  p.textContent = `decoded ${ok.length} of ${imgs.length}: ` + ok.map(i => i.naturalWidth + 'x' + i.naturalHeight).join(',');
  document.body.appendChild(p);
});</script>"""


def chromium(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A simulated movie analyzed with ``analyze --report``, plus a MUSICAL image and a motion table."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "c.yaml").write_text(yaml.safe_dump({"simulation": SCENE, "stages": ["frame_stats", "localize", "track", "diffusion"]}))
    config = load_config(tmp / "c.yaml")
    movie, truth = simulate_stack(config, "widefield", n_frames=80, size_px=48, n_particles=5, seed=4)
    tifffile.imwrite(tmp / "m.tif", movie)
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp / "m.tif"),
                          "--out", str(tmp / "res"), "--config", str(tmp / "c.yaml"), "--report"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp / "res" / "report.html").is_file()
    res = tmp / "res"
    assert main(["musical", str(tmp / "m.tif"), "--out", str(res / "musical" / "full_field.tif"), "--subpixels", "4",
                 "--pixel-size-nm", "100", "--na", "1.4", "--window-frames", "40"]) == 0
    # motion.csv as the motion stage will write it, taken from the simulation's exact states.
    with open(res / "motion.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["particle", "frame_start", "frame_end", "state", "probability"])
        for p in np.unique(truth["particle"]):
            t = truth[truth["particle"] == p]
            t = t[np.argsort(t["frame"])]
            cut = np.flatnonzero(t["state"][1:] != t["state"][:-1]) + 1
            for seg in np.split(np.arange(len(t)), cut):
                w.writerow([int(p), int(t["frame"][seg[0]]), int(t["frame"][seg[-1]]), t["state"][seg[0]], 1.0])
    return res, truth


@needs_chromium
def test_report_renders_in_chromium_with_every_section_and_image(analyzed: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    res, _ = analyzed
    report = tmp_path / "report.html"
    assert main(["report", str(res), "--out", str(report)]) == 0
    text = report.read_text()
    assert "http://" not in text and "https://" not in text, "the report must be self-contained"
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    # Run has none; diffusion, MSD, motion (timeline + matrix), MUSICAL, frame statistics: 6 images;
    # with segments.csv (the diffusion stage's change points) a regime timeline and matrix too.
    assert len(embedded) == 6 + (2 if (res / "segments.csv").exists() else 0)
    sizes = []
    for b64 in embedded:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            im.load()
            sizes.append(f"{im.width}x{im.height}")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", _PROBE + "</body>"))
    dom = chromium("--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in dom.stdout, heading
    probe = re.search(r'<p id="probe">decoded (\d+) of (\d+): ([^<]*)</p>', dom.stdout)
    assert probe is not None, "the probe script did not run"
    assert int(probe.group(1)) == int(probe.group(2)) == len(embedded)
    assert probe.group(3).split(",") == sizes  # Chromium decoded each PNG at the size it was drawn
    shot = tmp_path / "report.png"
    run = chromium("--window-size=1100,3000", f"--screenshot={shot}", report.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    # A blank page has variance 0; plots, text and images on white give far more than 100 (grey levels²).
    assert pixels.var() > 100, pixels.var()
    assert (pixels < 128).mean() > 0.01  # dark ink on more than 1 % of the page
    if os.environ.get("SCOPESTREAM_SCREENSHOT_DIR"):  # keep a copy to look at
        Path(os.environ["SCOPESTREAM_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["SCOPESTREAM_SCREENSHOT_DIR"]) / "report.png")


def test_report_numbers_against_truth(analyzed: tuple[Path, np.ndarray]) -> None:
    res, truth = analyzed
    # The transition matrix from the segments table equals the state changes frame by frame in TRUTH.
    states, counts = transition_counts(read_table(res / "motion.csv"))
    expected = np.zeros_like(counts)
    index = {s: k for k, s in enumerate(states)}
    for p in np.unique(truth["particle"]):
        t = truth[truth["particle"] == p]
        s = t["state"][np.argsort(t["frame"])]
        for a, b in zip(s[:-1], s[1:], strict=True):
            if a != b:
                expected[index[a], index[b]] += 1
    assert counts.sum() > 0
    np.testing.assert_array_equal(counts, expected)
    assert np.all(np.diag(counts) == 0)
    html = render_report(res)
    assert f"{int(counts.sum())} transitions between {len(states)} states" in html
    # Run counts come from run.json: 80 frames, none dropped.
    assert "<th>frames_processed</th><td>80</td>" in html and "<th>frames_dropped</th><td>0</td>" in html


def test_time_averaged_msd_exact() -> None:
    # Constant velocity (0.3, 0.4) px/frame, frame 3 missing: MSD(lag) = (0.5 lag)² exactly, and a
    # lag pairs only detections that many frames apart.
    frames = np.array([0, 1, 2, 4, 5, 6])
    x, y = 0.3 * frames, 0.4 * frames
    lags, msd = time_averaged_msd(frames, x, y, max_lag=6)
    assert lags.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(msd, (0.5 * lags) ** 2)


def test_report_of_an_empty_or_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "e.html")]) == 0
    assert "Nothing to report" in (tmp_path / "e.html").read_text()
    assert main(["report", str(tmp_path / "absent"), "--out", str(tmp_path / "a.html")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "a.html").exists()
    # A ragged table and an unreadable TIFF are named in the report; the rest is drawn.
    odd = tmp_path / "odd"
    (odd / "musical").mkdir(parents=True)
    (odd / "tracks.csv").write_text("frame,particle,x,y\n0,1,2\n")
    (odd / "musical" / "x.tif").write_bytes(b"not a tiff")
    (odd / "frame_stats.csv").write_text("frame,mean_adu,background_adu\n0,120,100\n1,118,100\n")
    page = render_report(odd)
    assert "could not read tracks.csv" in page and "could not read musical/x.tif" in page
    assert "Frame statistics over time" in page
