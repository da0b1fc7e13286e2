"""The Stage role: what an analysis plugin is, its life cycle, and how plugins are found and checked.

A stage is one step of the per-frame analysis (``frame_stats``, ``localize``, ``track``, ...).
It does no I/O: the engine calls :meth:`Stage.setup` once with what the run knows before the first
frame (:class:`RunContext`), then :meth:`Stage.process` with every frame, in order, from one thread.
``process`` returns :class:`Emission` objects that the engine stamps, publishes and (in
``analyze``) writes to result tables; it reads what earlier stages of the same frame produced, and
stores what it produces, in a typed :class:`~scopestream.daemon.Products` store.

Optional roles are separate protocols, checked with ``isinstance``: :class:`TearsDown` (flush at
the end of a run), :class:`TakesSettings` (settings changed over the control channel),
:class:`FollowsTiming` (the frame interval or exposure changed mid-run: a rate switch),
:class:`ReportsCounters` (running totals exported as metrics).

Slow work (MUSICAL windows, networks) goes off the stage thread through ``context.offload``
(:class:`Offload`); its results are published from the engine's housekeeping tick.

Plugins are found through the entry-point group ``scopestream.stages``; each entry point names a
:class:`StagePlugin`. Built-in stages are registered the same way as third-party ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydantic import BaseModel

from scopestream.daemon._frames import Frame
from scopestream.daemon._products import Products

if TYPE_CHECKING:
    from scopestream.daemon._config import CameraConfig, OpticsConfig, ScopestreamConfig
    from scopestream.daemon._messages import SourceDescription

ENTRY_POINT_GROUP = "scopestream.stages"

R = TypeVar("R")


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
        They are encoded later, on the sinks' threads: do not modify them after returning them
        (a stage that reuses buffers across frames must emit copies).
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


class Offload(Protocol):
    """The engine's off-thread service: runs slow work away from the stage thread.

    ``fn`` must be a picklable module-level function (a backend may run it in another process or
    on a Dask cluster); ``args`` must be picklable too. ``on_done(result)`` and
    ``on_fail(reason, detail)`` run on the engine's housekeeping thread when :meth:`poll` finds the job
    finished, never on the stage thread: keep them free of stage state, or lock it. Their
    emissions are published by the engine.
    """

    def submit(
        self,
        owner: str,
        fn: Callable[..., R],
        *args: Any,
        on_done: Callable[[R], Sequence[Emission]],
        on_fail: Callable[[str, str], Sequence[Emission]],
        max_in_flight: int | None = None,
        block: bool = False,
    ) -> bool:
        """Start ``fn(*args)`` for stage ``owner``; False when busy (nothing started: the stage
        counts the skip and publishes its own skip event). ``max_in_flight`` bounds this owner's
        jobs in flight; ``block`` waits for room instead of skipping (replay, where nothing may be
        lost)."""
        ...

    def poll(self) -> list[Emission]:
        """Run the callbacks of the jobs that finished; return their emissions."""
        ...

    def counters(self, owner: str) -> Mapping[str, int]:
        """Running totals for stage ``owner`` (submitted, done, failed, busy, in flight)."""
        ...

    def in_flight(self, owner: str | None = None) -> int:
        """Jobs submitted and not yet delivered (of ``owner``, or all)."""
        ...

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began: later submissions are refused."""
        ...

    def close(self, timeout_s: float | None = None) -> list[Emission]:
        """Wait up to ``timeout_s`` for jobs in flight, deliver them, report the rest through
        ``on_fail("teardown", ...)``, stop the workers; returns those callbacks' emissions."""
        ...


@dataclass(frozen=True)
class RunContext:
    """What a run knows before its first frame; given to every stage's :meth:`Stage.setup`.

    Attributes
    ----------
    frame_shape_px
        ``(height, width)`` of the frames the source delivers.
    dtype
        Their pixel dtype.
    pixel_size_nm
        Sample-plane pixel size (``optics.pixel_size_nm``).
    frame_interval_ms, exposure_ms
        Timing of the acquisition (``acquisition.*``; the frame period is the larger of the two).
        A ``set_interval`` or ``set_exposure`` action changes them mid-run: stages that use them
        take the role :class:`FollowsTiming`.
    camera, optics
        The configuration sections.
    source
        The source's own description (kind, camera label, mode).
    offload
        The off-thread service for slow work.
    """

    frame_shape_px: tuple[int, int]
    dtype: np.dtype[Any]
    pixel_size_nm: float
    frame_interval_ms: float
    exposure_ms: float
    camera: CameraConfig
    optics: OpticsConfig
    source: SourceDescription
    offload: Offload


@runtime_checkable
class Stage(Protocol):
    """An analysis step, fed one frame at a time, in order, from one thread.

    ``setup(context)`` runs once per run, after the source is open and before the first frame
    (load weights, allocate buffers for ``context.frame_shape_px``, warm up). ``process`` returns
    the emissions for this frame (possibly none), may read products of earlier stages with
    ``products.get(T)`` and stores its own with ``products.put(obj)``. A stage that raises is
    reported (``stage_error``) and counted; the run goes on.
    """

    name: str

    def setup(self, context: RunContext) -> None:
        """Prepare for a run."""
        ...

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        """Analyse one frame."""
        ...


@runtime_checkable
class TearsDown(Protocol):
    """A stage with something to flush when the run ends (e.g. end all open tracks)."""

    def teardown(self) -> Sequence[Emission]:
        """The run is ending: return the last emissions."""
        ...


@runtime_checkable
class TakesSettings(Protocol):
    """A stage whose settings may change while running (between frames).

    ``apply_settings`` receives an instance of the plugin's ``settings_model``. It must either
    take all of them or raise and keep the old ones.
    """

    def apply_settings(self, settings: Any) -> None:
        """Use new settings from the next frame on."""
        ...


@runtime_checkable
class FollowsTiming(Protocol):
    """A stage whose work depends on the frame interval or exposure (e.g. D in µm²/s).

    When an ``act`` (``set_interval``, ``set_exposure``) changes the acquisition's timing, the
    engine calls ``timing_changed`` on the stage thread, between frames, before the first frame
    acquired with the new timing: the first whose exposure began after the action was done
    (``t_acquired >= t_done + the old exposure``). ``context`` is the run's context with the new
    ``frame_interval_ms`` (the new frame period) and ``exposure_ms``. The stage returns what it
    has to publish under the old timing (e.g. estimates of tracks cut at the switch).
    """

    def timing_changed(self, context: RunContext) -> Sequence[Emission]:
        """Use ``context.frame_interval_ms`` and ``context.exposure_ms`` from the next frame on."""
        ...


@runtime_checkable
class LooksAhead(Protocol):
    """A stage that does the same work faster for several frames at once (a network's batch).

    When the engine is behind (frames wait on the bus), the stage thread takes up to
    ``look_ahead_frames`` waiting frames at once and calls ``look_ahead`` with them, in order,
    before ``process`` is called on each of them as usual. The stage may compute what ``process``
    will need for those frames in one batch and keep it until then; it publishes nothing from
    ``look_ahead``, and a failure there is reported and leaves ``process`` to do the work frame by
    frame. ``look_ahead_frames`` of 1 turns batching off.
    """

    look_ahead_frames: int

    def look_ahead(self, frames: Sequence[Frame]) -> None:
        """Prepare ``frames`` (the current frame first) in one batch."""
        ...


@runtime_checkable
class ReportsCounters(Protocol):
    """A stage with running totals to export as metrics (``scopestream_stage_counter``)."""

    def counters(self) -> Mapping[str, int]:
        """Running totals, named with units (e.g. ``windows_skipped``)."""
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
    consumes
        Product types the stage needs from earlier stages of the same frame; a pipeline in which
        no earlier stage produces one of them is a configuration error.
    produces
        Product types the stage stores for later stages.
    consumes_if_present
        Product types the stage reads when an earlier stage produces them, and does without
        otherwise.
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
    consumes: tuple[type, ...] = ()
    produces: tuple[type, ...] = ()
    consumes_if_present: tuple[type, ...] = ()
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


def check_products(stages: Sequence[str], plugins: Mapping[str, StagePlugin]) -> None:
    """Check that every product a stage consumes is produced by a stage before it.

    Raises
    ------
    ValueError
        Naming the stage, the product, and which installed stage would produce it.
    """
    produced: set[type] = set()
    for name in stages:
        plugin = plugins[name]
        for kind in plugin.consumes:
            if kind in produced:
                continue
            makers = sorted(n for n, p in plugins.items() if kind in p.produces and n != name)
            if not makers:
                hint = "no installed stage produces it"
            elif any(m in stages for m in makers):
                hint = f"stage {makers[0]!r} produces it: list it before {name!r}"
            else:
                hint = f"installed stage(s) {makers} produce it: add one before {name!r}"
            raise ValueError(
                f"stage {name!r} consumes {kind.__name__}, which no stage before it produces "
                f"(stages are {list(stages)}); {hint}"
            )
        produced.update(plugin.produces)


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
            "Stage protocol (needs a `name` attribute, `setup(context)` and `process(frame, products)`)"
        )
    return stage
