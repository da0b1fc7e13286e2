"""The Stage role: what an analysis plugin is, and how plugins are found and checked.

A stage is one step of the per-frame analysis (``frame_stats``, ``localize``, ``track``, ...).
It does no I/O: the runner feeds it frames, and it returns :class:`Emission` objects that the
engine stamps, publishes and (in ``analyze``) writes to result tables. A stage keeps its state in
one object and may read what earlier stages produced for the same frame from ``products``.

Plugins are found through the entry-point group ``scopestream.stages``; each entry point names a
:class:`StagePlugin`. Built-in stages are registered the same way as third-party ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from scopestream.daemon._frames import Frame

if TYPE_CHECKING:
    from scopestream.daemon._config import ScopestreamConfig

ENTRY_POINT_GROUP = "scopestream.stages"


@dataclass(frozen=True, slots=True)
class Emission:
    """Something a stage wants published.

    Attributes
    ----------
    topic
        The event topic (ASCII), e.g. ``"localizations"``. Must be declared in the plugin's
        ``topics`` so that its body model is part of the published JSON Schema.
    body
        The message body, an instance of the pydantic model declared for ``topic``.
    arrays
        Named numeric arrays sent as raw buffers after the body (their dtype and shape go in the
        header). For tables, use 1-D arrays of one length: one element per row.
    frame_seq
        The frame this emission derives from (``Frame.seq``), or None.
    t_acquired
        Acquisition time (Unix seconds) of that frame, or None.
    """

    topic: str
    body: BaseModel
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    frame_seq: int | None = None
    t_acquired: float | None = None


@runtime_checkable
class Stage(Protocol):
    """An analysis step, fed one frame at a time, in order, from one thread.

    ``process`` returns the emissions for this frame (possibly none) and may store a product in
    ``products[name]`` for later stages of the same frame (e.g. ``localize`` stores its table and
    ``track`` reads it). A stage that raises is logged and counted; the run goes on.

    Optional methods, looked up with ``getattr``:

    - ``teardown() -> Sequence[Emission]``: the run is ending; flush (e.g. end all open tracks).
    - ``apply_settings(settings) -> None``: new settings (same model as at construction) that the
      control channel changed at run time; called between frames.
    - ``counters() -> Mapping[str, int]``: running totals the stage wants exported as metrics
      (e.g. windows skipped), named with units.
    """

    name: str

    def process(self, frame: Frame, products: MutableMapping[str, Any]) -> Sequence[Emission]:
        """Analyse one frame."""
        ...


# The settings argument is an instance of the plugin's own ``settings_model`` (checked by
# :func:`build_stage`), so a stage class whose ``__init__(config, settings)`` takes that model can be
# the factory itself.
StageFactory = Callable[["ScopestreamConfig", Any], Stage]


@dataclass(frozen=True)
class StagePlugin:
    """What an entry point in ``scopestream.stages`` names.

    Attributes
    ----------
    name
        The stage name used in the config's ``stages`` list and as its settings section key.
    settings_model
        Pydantic model of the stage's settings section (``<name>.*`` in the configuration); every
        field has a default, a unit in its name where it has one, and a description.
    build
        ``build(config, settings) -> Stage``; usually the stage class itself.
    topics
        Topic name -> body model, for every topic the stage publishes.
    requires
        Stages that must run before this one in the same pipeline (their products are read).
    runtime_settable
        Settings fields that ``set`` over the control channel may change while running.
    tables
        Topic -> result table file name written by ``analyze`` (e.g. ``{"track": "tracks.csv"}``).
    description
        One line for listings.
    """

    name: str
    settings_model: type[BaseModel]
    build: StageFactory
    topics: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    runtime_settable: frozenset[str] = frozenset()
    tables: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


def stage_plugin_names() -> list[str]:
    """Names of the stage plugins registered in the entry-point group, without loading any.

    Reading entry points costs no import of the plugins' modules (nor of what they import: scipy,
    torch, ...), so listing stages and validating a configuration that names few of them stays
    cheap.
    """
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _install_hint(ep: EntryPoint, exc: ImportError) -> str:
    """What to install so that the entry point ``ep`` imports, from the missing module's name."""
    dist = ep.dist
    missing = (exc.name or "").split(".")[0]
    if dist is None:
        return f"install the package that provides {missing!r}" if missing else "reinstall the package that registered it"
    normal = missing.replace("_", "-").lower()
    for requirement in dist.requires or ():
        req_name, _, marker = requirement.partition(";")
        name = req_name.strip().split("[")[0]
        for sep in "<>=!~ (":
            name = name.split(sep)[0]
        if name.replace("_", "-").lower() == normal and "extra ==" in marker:
            extra = marker.split("extra ==")[1].strip().strip("'\"")
            return f"install it with `pip install '{dist.metadata['Name']}[{extra}]'`"
    if missing:
        return f"install the package that provides the module {missing!r} (needed by {dist.metadata['Name']})"
    return f"reinstall {dist.metadata['Name']}"


def load_stage_plugin(name: str) -> StagePlugin:
    """Import the entry point ``name`` of the group ``scopestream.stages`` and check it.

    Raises
    ------
    KeyError
        If no entry point has that name.
    ImportError
        If the plugin's module (or something it imports) is not installed; the message names the
        stage, the entry point and the package to install.
    TypeError
        If the entry point does not name a :class:`StagePlugin`, or its name disagrees.
    """
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise KeyError(f"no stage plugin named {name!r}; installed stages: {stage_plugin_names()}")
    ep = matches[0]
    try:
        plugin = ep.load()
    except ImportError as exc:
        raise ImportError(
            f"stage {name!r} (entry point {ep.value}) cannot be loaded: {exc}; {_install_hint(ep, exc)}",
            name=exc.name,
        ) from exc
    if not isinstance(plugin, StagePlugin):
        raise TypeError(
            f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} must name a "
            f"scopestream.daemon.StagePlugin, not {type(plugin).__name__}"
        )
    if plugin.name != ep.name:
        raise TypeError(
            f"entry point {ep.name!r} ({ep.value}) names a StagePlugin called {plugin.name!r}"
        )
    return plugin


def installed_stage_plugins() -> dict[str, StagePlugin]:
    """Every stage plugin registered in the entry-point group, by name (each one loaded).

    Prefer :func:`stage_plugin_names` and :func:`load_stage_plugin` where only some are needed.

    Raises
    ------
    ImportError, TypeError
        As :func:`load_stage_plugin`.
    """
    return {name: load_stage_plugin(name) for name in stage_plugin_names()}


def build_stage(plugin: StagePlugin, config: ScopestreamConfig, settings: BaseModel) -> Stage:
    """Build a stage from its validated settings and check that it fits the :class:`Stage` protocol."""
    if not isinstance(settings, plugin.settings_model):
        raise TypeError(
            f"stage {plugin.name!r} takes {plugin.settings_model.__name__} settings, not {type(settings).__name__}"
        )
    stage = plugin.build(config, settings)
    if not isinstance(stage, Stage):
        raise TypeError(
            f"stage plugin {plugin.name!r} built a {type(stage).__name__}, which does not fit the "
            "Stage protocol (needs a `name` attribute and `process(frame, products)`)"
        )
    return stage
