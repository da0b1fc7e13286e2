"""Settings validation, the library API and the `simulate` command of the simulated cameras."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest
import tifffile

from scopestream.daemon._config import ConfigError, build_config
from scopestream.daemon._errors import InputError
from scopestream.sim_camera import (
    TRUTH_CSV_FIELDS,
    SimulationSettings,
    config_path,
    settings_from_mapping,
    simulate_stack,
)
from scopestream.sim_camera.cli import add_simulate_command


@pytest.mark.parametrize(
    ("simulation", "named"),
    [
        ({"D_um2_per_s": -0.1}, "simulation.D_um2_per_s"),
        ({"D_um2_per_s": [0.5, 0.1]}, "simulation.D_um2_per_s"),
        ({"rcir_radius_nm": 0}, "simulation.rcir_radius_nm"),
        ({"circ_radius_nm": [-5, 300]}, "simulation.circ_radius_nm"),
        ({"states": ["RanW", "Walk"]}, "simulation.states"),
        ({"states": []}, "simulation.states"),
        ({"photons_per_frame": float("nan")}, "simulation.photons_per_frame"),
        ({"photons_per_frame": float("inf")}, "simulation.photons_per_frame"),
        ({"blink_on_mean_ms": 0}, "simulation.blink_on_mean_ms"),
        ({"bleach_half_life_ms": -1}, "simulation.bleach_half_life_ms"),
        ({"particle_kind": "cloud"}, "simulation.particle_kind"),
        ({"dwell_ms": {"RanW": 10}, "states": ["RanW", "Stat"]}, "simulation.dwell_ms"),
        ({"frame_width_px": 2}, "simulation.frame_width_px"),
        ({"unknown_key": 1}, "simulation.unknown_key"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(simulation: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        settings_from_mapping(simulation)


def test_settings_model_is_frozen_documented_and_has_units() -> None:
    settings = settings_from_mapping({"D_um2_per_s": 0.5, "states": ["RanW"], "photons_per_frame": 2000,
                                      "background_photons_per_px": 10, "particle_kind": "point"})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        settings.D_um2_per_s = 1.0  # type: ignore[misc]
    unitless = {"particle_kind", "states", "n_particles", "fluorophores_per_vesicle", "psf_model",
                "substeps_per_exposure", "z_diffusion", "photons_per_frame"}
    units = ("_nm", "_px", "_ms", "_us", "_um", "_per_s")
    for name, field in SimulationSettings.model_fields.items():
        assert field.description, name
        assert name in unitless or any(u in name for u in units), name


def test_simulate_stack_contract() -> None:
    config = build_config({"simulation": {"particle_kind": "point", "states": ["RanW"], "D_um2_per_s": 0.5}})
    movie, truth = simulate_stack(config, "widefield", 4, size_px=20, n_particles=3, seed=0)
    assert movie.shape == (4, 20, 20) and movie.dtype == np.uint16
    for name, kind in [("frame", "i"), ("particle", "i"), ("x", "f"), ("y", "f"), ("z", "f"),
                       ("D_um2_per_s", "f"), ("photons", "f"), ("visible", "b")]:
        assert truth.dtype[name].kind == kind, name
    assert truth.dtype["state"] == np.dtype("U4")
    assert set(truth["state"]) == {"RanW"}
    assert np.array_equal(np.unique(truth["frame"]), np.arange(4))
    assert (truth["visible"] & (truth["frame"] == 0)).sum() == 3
    with pytest.raises(ConfigError, match="n_frames"):
        simulate_stack(config, "widefield", 0)
    with pytest.raises(ConfigError, match="kind"):
        simulate_stack(config, "confocal", 2)  # type: ignore[arg-type]


def test_config_path_names_the_shipped_files() -> None:
    for name in ("simulated-widefield", "simulated-scanning"):
        path = config_path(name)
        assert path.is_file() and path.suffix == ".cfg"
        assert "scopestream.sim_camera.devices" in path.read_text()
    with pytest.raises(ConfigError, match="simulated-widefield"):
        config_path("simulated-confocal")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scopestream")
    add_simulate_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_simulate_command_writes_movie_and_truth(tmp_path) -> None:
    movie_path, truth_path = tmp_path / "movie.tif", tmp_path / "truth.csv"
    args = _parse(["simulate", "widefield", "--frames", "5", "--size", "24", "--particles", "4", "--seed", "9",
                   "--out", str(movie_path), "--truth", str(truth_path),
                   "--set", "simulation.particle_kind=point", "--set", "simulation.states=[Flow]"])
    assert args.func(args) == 0
    movie = tifffile.imread(movie_path)
    config = build_config({"simulation": {"particle_kind": "point", "states": ["Flow"]}})
    expected_movie, expected_truth = simulate_stack(config, "widefield", 5, size_px=24, n_particles=4, seed=9)
    assert np.array_equal(movie, expected_movie)
    with open(truth_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == TRUTH_CSV_FIELDS
    assert tuple(TRUTH_CSV_FIELDS[:7]) == ("frame", "particle", "x", "y", "state", "D_um2_per_s", "photons")
    assert len(rows) == expected_truth.size
    assert [float(r["x"]) for r in rows] == expected_truth["x"].tolist()
    assert {r["state"] for r in rows} == {"Flow"}


def test_simulate_command_refuses_bad_input(tmp_path) -> None:
    out = ["--out", str(tmp_path / "m.tif"), "--truth", str(tmp_path / "t.csv")]
    args = _parse(["simulate", "scanning", "--frames", "0", *out])
    with pytest.raises(InputError, match="--frames"):
        args.func(args)
    args = _parse(["simulate", "scanning", "--frames", "2", "--set", "simulation.D_um2_per_s=-1", *out])
    with pytest.raises(ConfigError, match=r"simulation\.D_um2_per_s"):
        args.func(args)
    args = _parse(["simulate", "scanning", "--frames", "2", "--out", str(tmp_path / "nope" / "m.tif"),
                   "--truth", str(tmp_path / "t.csv")])
    with pytest.raises(InputError, match="--out"):
        args.func(args)
