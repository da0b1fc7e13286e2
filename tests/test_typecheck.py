"""mypy over the package, as CI runs it.

The repository root is the package ``scopestream``, so mypy would name modules after whatever
folder the checkout lives in; a symlink called ``scopestream`` gives it the right name.
"""

from __future__ import annotations

import os
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_is_clean(tmp_path: Path) -> None:
    (tmp_path / "scopestream").symlink_to(ROOT, target_is_directory=True)
    old = os.environ.get("MYPYPATH")
    os.environ["MYPYPATH"] = str(tmp_path)
    try:
        out, err, status = api.run([
            "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / ".mypy_cache"),
            "-p", "scopestream.daemon", "-p", "scopestream.plugins", "-p", "scopestream.sim_camera",
            "-p", "scopestream.models", "-p", "scopestream.viewer", "-m", "scopestream", "-m", "scopestream.client",
        ])
    finally:
        if old is None:
            os.environ.pop("MYPYPATH", None)
        else:
            os.environ["MYPYPATH"] = old
    assert status == 0, out + err
