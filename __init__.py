"""scopestream: live analysis of microscope camera streams, published over ZeroMQ.

The repository root is this package; its folders are the subpackages:
``scopestream.daemon`` (the engine), ``scopestream.plugins`` (analysis stages),
``scopestream.models`` (networks), ``scopestream.sim_camera`` (simulators).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scopestream")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
