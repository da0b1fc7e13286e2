"""The installed package is the repository: every source package and every data file a run
reads is in pyproject's lists, so `pip install .` (the README's command, not editable) works.

The defect this guards against: `scopestream.models.localize` was missing from the package list;
the editable install of the tests and CI did not notice, a plain install failed on the simulated
scanning camera (whose default localization is the network)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests", "examples", "benchmarks", "deploy", "docs", "build", "node_modules"}


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_dirs() -> list[Path]:
    return [
        p.parent for p in ROOT.rglob("__init__.py")
        if not any(part in NOT_SHIPPED or part.startswith(".") for part in p.relative_to(ROOT).parts)
    ]


def test_every_source_package_is_listed() -> None:
    listed = set(_setuptools()["packages"])
    found = {".".join(["scopestream", *d.relative_to(ROOT).parts]) for d in _source_dirs()}
    assert found - listed == set(), f"packages missing from pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_every_shipped_model_file_and_data_file_is_package_data() -> None:
    """Each file of the shipped model folders, the calibration table, the schemas and the
    simulated configurations matches a package-data pattern of its package."""
    data = _setuptools()["package-data"]
    wanted = {
        "scopestream.models": [p for p in (ROOT / "models" / "weights").rglob("*") if p.is_file()],
        "scopestream.plugins": [ROOT / "plugins" / "_loc_calibration.json"],
        "scopestream.daemon": list((ROOT / "daemon" / "schemas").glob("*.json")),
        "scopestream.sim_camera": list((ROOT / "sim_camera").glob("*.cfg")),
    }
    for package, files in wanted.items():
        base = ROOT.joinpath(*package.split(".")[1:])
        assert files, package
        for f in files:
            rel = f.relative_to(base).as_posix()
            assert any(fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in data[package]), \
                f"{rel} of {package} matches no package-data pattern {data[package]}"
