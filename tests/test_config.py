"""Configuration hardening: strict finite bounded numbers, cross-section checks, bounded file
reading, and stage plugins loaded only when a configuration names them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scopestream.daemon._config import (
    MAX_CONFIG_FILE_BYTES,
    MAX_NESTING_DEPTH,
    MAX_YAML_NODES,
    ConfigError,
    config_with,
    load_config,
    read_config_file,
)


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    message = str(info.value)
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize("key", [
    "optics.na", "acquisition.exposure_ms", "bus.capacity_frames", "camera.em_gain",
    "localize.threshold_snr", "track.max_displacement_px", "musical.alpha", "frame_stats.sample_stride_px",
    "simulation.n_particles", "simulation.photons_per_frame",
])
def test_a_boolean_is_not_a_number(key: str) -> None:
    message = _refused(f"{key}=true")
    assert key in message and "(given True)" in message


@pytest.mark.parametrize(("key", "value"), [
    ("acquisition.exposure_ms", ".inf"),
    ("localize.min_separation_px", ".inf"),
    ("musical.threshold", ".nan"),
    ("musical.threshold", ".inf"),
    ("musical.threshold", "-.inf"),
    ("optics.wavelength_nm", ".nan"),
    ("simulation.D_um2_per_s", ".inf"),
    ("simulation.D_um2_per_s", "[0.1, .nan]"),
])
def test_no_nan_or_infinity_anywhere(key: str, value: str) -> None:
    message = _refused(f"{key}={value}")
    assert key in message and "finite" in message


@pytest.mark.parametrize(("key", "value", "limit"), [
    ("bus.capacity_frames", "100000000000", "1024"),
    ("bus.capacity_frames", "1e11", "valid integer"),  # read as the float 1e11, not a string
    ("source.poll_interval_ms", "1e9", "1000"),
    ("track.max_displacement_px", "1e308", "1000"),
    ("events.send_hwm_messages", "1000000000", "1000000"),
    ("simulation.photons_per_frame", "1e300", "1000000000"),
    ("simulation.D_um2_per_s", "1e300", "10000"),
    ("musical.device", "bogus", "pattern"),
])
def test_every_size_setting_is_bounded(key: str, value: str, limit: str) -> None:
    message = _refused(f"{key}={value}")
    assert key in message and limit in message


def test_exponent_notation_reads_as_a_number() -> None:
    # PyYAML (YAML 1.1) would read `1e-2` as a string; YAML 1.2 and users read a number.
    config = load_config(None, ["localize.tolerance_px=1e-2", "events.heartbeat_interval_s=5E-1"])
    assert config.stage_settings("localize").tolerance_px == 0.01  # type: ignore[attr-defined]
    assert config.events.heartbeat_interval_s == 0.5


def test_musical_region_is_checked_against_the_psf_window_from_optics() -> None:
    # N_w = 1 + 2 floor(0.61 λ / (NA p)): 510 nm, NA 1.4, 20 nm pixels -> 1 + 2 floor(11.11) = 23 px.
    message = _refused("optics.pixel_size_nm=20", "musical.region_px=21")
    assert "musical: region_px (21) is smaller than the MUSICAL PSF window (23 px" in message
    load_config(None, ["optics.pixel_size_nm=20", "musical.region_px=23"])
    # default optics (100 nm pixels): window 5 px
    assert "(5 px" in _refused("musical.region_px=4")
    # the stage's own optics override wins
    assert "(23 px" in _refused("musical.pixel_size_nm=20", "musical.region_px=21")
    # a change at run time goes through the same check
    with pytest.raises(ConfigError, match=r"region_px \(4\)"):
        config_with(load_config(), "musical.region_px", 4)
    # ... also when the optics change under an unchanged region
    with pytest.raises(ConfigError, match="PSF window"):
        config_with(load_config(None, ["musical.region_px=5"]), "optics.pixel_size_nm", 50)


def test_simulation_section_is_validated_when_the_camera_is_simulated(tmp_path: Path) -> None:
    assert "simulation.photons_per_frame" in _refused("simulation.photons_per_frame=-1")
    assert "simulation.nonsense: unknown key" in _refused("simulation.nonsense=1")
    # background alone above saturation: a check that spans simulation and camera
    assert "every pixel would be saturated" in _refused("simulation.background_photons_per_px=40000")
    # a recorded stack has no simulation: the section is not the simulators' business then
    config = load_config(None, ["source.kind=file", f"source.file_path={tmp_path / 'x.tif'}",
                                "simulation.photons_per_frame=-1"])
    assert not config.uses_simulated_camera


def _bomb(levels: int) -> str:
    lines = ['simulation:', '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*l{i - 1}"] * 9)
        lines.append(f"  l{i}: &l{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(9))  # 9**9 = 387 million strings once expanded
    with pytest.raises(ConfigError, match=f"more than {MAX_YAML_NODES} values"):
        read_config_file(path)
    path.write_text(_bomb(3))  # 9**3: a few aliases are fine
    assert len(read_config_file(path)["simulation"]["l2"]) == 9
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        read_config_file(path)


def test_files_that_are_not_configurations_are_refused_by_name(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(Path(sys.executable).read_bytes()[:4096])
    with pytest.raises(ConfigError, match="is not a text file"):
        read_config_file(binary)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"optics:\n  na: 1.2 # \xe9\n")
    with pytest.raises(ConfigError, match="is not a text file"):
        read_config_file(latin)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_FILE_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_FILE_BYTES} bytes"):
        read_config_file(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * (MAX_NESTING_DEPTH + 5) + "]" * (MAX_NESTING_DEPTH + 5) + "\n")
    with pytest.raises(ConfigError, match="nests deeper"):
        read_config_file(deep)
    deeper = tmp_path / "deeper.toml"
    deeper.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nests"):
        read_config_file(deeper)


def _fake_plugin_distribution(root: Path) -> None:
    """A distribution whose stage plugin imports a module that is not installed."""
    dist = root / "fakeplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(textwrap.dedent("""\
        Metadata-Version: 2.1
        Name: fakeplug
        Version: 0.1
        Provides-Extra: net
        Requires-Dist: nosuchpkg-abc>=1; extra == "net"
        """))
    (dist / "entry_points.txt").write_text("[scopestream.stages]\nbroken_net = fakeplug_mod:PLUGIN\n")
    (root / "fakeplug_mod.py").write_text("import nosuchpkg_abc\nPLUGIN = None\n")


def test_only_named_plugins_are_loaded_and_a_broken_one_says_what_to_install(tmp_path: Path) -> None:
    _fake_plugin_distribution(tmp_path)
    env_path = str(tmp_path)
    script = textwrap.dedent("""\
        import sys
        from scopestream.daemon._config import load_config, ConfigError
        from scopestream.daemon._stage import stage_plugin_names
        assert "broken_net" in stage_plugin_names(), stage_plugin_names()
        config = load_config(None, ["stages=[frame_stats]", "source.kind=file", "source.file_path=x.tif"])
        loaded = sorted(m for m in sys.modules if m.startswith("scopestream.plugins.") or m == "fakeplug_mod")
        print("LOADED", loaded)
        try:
            load_config(None, ["stages=[frame_stats, broken_net]"])
        except ConfigError as exc:
            print("ERROR", exc)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert out.returncode == 0, out.stderr
    assert "LOADED ['scopestream.plugins.frame_stats']" in out.stdout, out.stdout
    error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR"))
    assert "stage 'broken_net' (entry point fakeplug_mod:PLUGIN) cannot be loaded" in error
    assert "No module named 'nosuchpkg_abc'" in error
    assert "pip install 'fakeplug[net]'" in error
