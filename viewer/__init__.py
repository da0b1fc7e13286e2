"""scopestream in napari: a dock widget that watches a running daemon, and a reader for
``analyze`` result folders.

Install with ``pip install "scopestream[napari]"``; napari finds both through the npe2 manifest
``napari.yaml`` (plugin name ``scopestream``). Nothing here imports Qt until napari asks for the
widget, so the package stays importable without the extra.
"""

from __future__ import annotations

__all__: list[str] = []
