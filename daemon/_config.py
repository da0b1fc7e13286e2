"""The daemon's configuration: pydantic models, loading from YAML or TOML, ``--set`` overrides.

Units are in every field name. Stage settings live in a section named after the stage
(``localize.threshold_snr``); their models come from the stage plugins, so a third-party stage's
section is validated the same way as a built-in's. Only the plugins that a configuration names
(in ``stages`` or as a section) are imported.

Every number is finite and bounded, and a boolean is never taken for a number. Checks that span
sections run here too, so ``scopestream config --check`` catches them: a stage's settings model
is validated with the pydantic context ``{"optics": ..., "camera": ..., "acquisition": ...,
"source": ...}`` (the validated sections) and may check itself against them in a
``model_validator``; the ``simulation`` section is validated by :mod:`scopestream.sim_camera`
when the source is a simulated camera (imported only then).

Files are read with bounds: at most :data:`MAX_CONFIG_FILE_BYTES`, text only, YAML aliases
expanding to at most :data:`MAX_YAML_NODES` nodes, nesting at most :data:`MAX_NESTING_DEPTH`.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scopestream.daemon._actuators import LimitsConfig
from scopestream.daemon._errors import ConfigError
from scopestream.daemon._rules import RuleCheckError, RuleConfig, check_rules
from scopestream.daemon._stage import (
    StagePlugin,
    check_products,
    load_stage_plugin,
    stage_plugin_names,
)

__all__ = [
    "DEFAULT_STAGES",
    "MAX_CONFIG_FILE_BYTES",
    "MAX_NESTING_DEPTH",
    "MAX_YAML_NODES",
    "ConfigError",
    "ScopestreamConfig",
    "apply_override",
    "build_config",
    "config_to_dict",
    "config_with",
    "default_config_yaml",
    "describe_validation_error",
    "load_config",
    "parse_override",
    "read_config_file",
    "register_stage_plugin",
    "stage_plugins",
]

DEFAULT_STAGES: tuple[str, ...] = ("frame_stats", "preview", "localize", "track", "diffusion", "musical", "motion")

MAX_CONFIG_FILE_BYTES = 1 << 20
"""Largest configuration file read, bytes (a configuration is a few kB)."""
MAX_YAML_NODES = 100_000
"""Most YAML nodes a document may expand to once aliases are followed (defeats alias bombs)."""
MAX_NESTING_DEPTH = 64
"""Deepest nesting of mappings and lists in a configuration file or value."""

SIMULATED_CAMERAS = ("simulated-widefield", "simulated-scanning")


class _Section(BaseModel):
    # strict: a boolean is never a number (true is not 1.0) and a string is never parsed into
    # one; integers are still accepted for floats. No NaN or infinity anywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)


class OpticsConfig(_Section):
    pixel_size_nm: float = Field(100.0, gt=0, le=100_000, description="Pixel size in the sample plane (camera pixel / magnification), nm.")
    wavelength_nm: float = Field(510.0, ge=100, le=20_000, description="Emission wavelength, nm.")
    na: float = Field(1.4, gt=0, le=1.7, description="Numerical aperture of the objective.")


class CameraConfig(_Section):
    offset_adu: float = Field(100.0, ge=0, le=4_294_967_295, description="Camera offset (bias) added to every pixel, ADU.")
    gain_e_per_adu: float = Field(0.5, gt=0, le=1e6, description="Conversion gain: photoelectrons per ADU.")
    read_noise_e: float = Field(1.5, ge=0, le=1e6, description="Gaussian read noise, standard deviation in electrons.")
    em_gain: float = Field(1.0, ge=1, le=100_000, description="EMCCD multiplication gain; 1 means no EM register (sCMOS/CCD).")
    saturation_adu: int = Field(65535, gt=0, le=4_294_967_295, description="Largest value the camera can report, ADU.")


class AcquisitionConfig(_Section):
    exposure_ms: float = Field(10.0, gt=0, le=3_600_000, description="Exposure time per frame, ms (at most an hour).")
    frame_interval_ms: float = Field(10.0, gt=0, le=3_600_000, description="Time between the starts of successive frames, ms (at most an hour).")

    @model_validator(mode="after")
    def _exposure_fits(self) -> AcquisitionConfig:
        if self.exposure_ms > self.frame_interval_ms:
            raise ValueError(
                f"exposure_ms ({self.exposure_ms}) is longer than frame_interval_ms "
                f"({self.frame_interval_ms}); an exposure cannot outlast the frame"
            )
        return self


class SourceConfig(_Section):
    kind: Literal["micromanager", "file"] = Field(
        "micromanager", description="Where frames come from: a Micro-Manager core, or a recorded stack."
    )
    mm_config: str = Field(
        "simulated-widefield",
        description=(
            "Micro-Manager system configuration: a file path, 'demo' (the DemoCamera config that "
            "mm-test-adapters ships) or 'simulated-widefield' / 'simulated-scanning' (scopestream's "
            "simulated cameras as Python devices)."
        ),
    )
    mm_adapter_paths: list[str] = Field(
        default_factory=list, description="Extra folders to search for Micro-Manager device adapters."
    )
    mode: Literal["continuous", "mda"] = Field(
        "continuous", description="Continuous sequence acquisition, or a useq MDA sequence run by core.mda."
    )
    mda_sequence: dict[str, Any] | None = Field(
        None, description="useq.MDASequence as a mapping (mode 'mda'); default: time_plan of frames_limit frames."
    )
    frames_limit: int | None = Field(
        None, gt=0, le=10**12, description="Stop after this many frames (None: until stopped)."
    )
    file_path: str | None = Field(None, description="Multi-page TIFF / OME-TIFF to replay (kind 'file').")
    replay_fps: float | None = Field(
        None, gt=0, le=100_000, description="Pace file replay at this frame rate (live behaviour, frames may drop); None: as fast as possible, nothing dropped."
    )
    poll_interval_ms: float = Field(1.0, gt=0, le=1000, description="How long the Micro-Manager drain thread sleeps when the buffer is empty, ms (at most 1000); it adds at most this much latency to a frame.")
    sequence_buffer_mb: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Micro-Manager circular (sequence) buffer, MB (setCircularBufferMemoryFootprint); None: the core's default (UNICORE_SEQUENCE_BUFFER_MB for Python cameras).",
    )
    on_error: Literal["stop", "reconnect"] = Field(
        "stop",
        description=(
            "What a Micro-Manager source does when the camera fails mid-run (raises, stops its "
            "acquisition by itself, vanishes): 'stop' ends the run (exit_status 'failed'); "
            "'reconnect' reopens the core and restarts the sequence (continuous mode only). "
            "Either way a source_error event is published."
        ),
    )
    reconnect_attempts: int = Field(
        3, ge=1, le=1000, description="Reconnect attempts per outage (on_error 'reconnect'); a reconnect that delivers a frame resets the count."
    )
    reconnect_delay_ms: float = Field(
        500.0, ge=0, le=600_000, description="Wait before each reconnect attempt, ms."
    )

    @model_validator(mode="after")
    def _reconnect_needs_continuous(self) -> SourceConfig:
        if self.on_error == "reconnect" and self.mode == "mda":
            raise ValueError(
                "on_error: 'reconnect' works in mode 'continuous' only (an MDA sequence cannot be "
                "resumed where it failed); use on_error: 'stop' with mode 'mda'"
            )
        return self


class BusConfig(_Section):
    capacity_frames: int = Field(64, ge=1, le=1024, description="Frames the bus holds between the source and the stages (at most 1024: the bus holds whole frames in memory).")
    policy: Literal["auto", "drop", "block"] = Field(
        "auto", description="Full bus: 'drop' (live; count the frame dropped), 'block' (replay; lose nothing), 'auto': drop for cameras, block for unpaced files."
    )


class EventsConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB endpoint that events are published on.")
    send_hwm_messages: int = Field(10000, ge=1, le=1_000_000, description="PUB send high-water mark per subscriber, messages; beyond it a slow subscriber loses messages, acquisition never waits.")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=3600, description="Seconds between heartbeat events.")
    wait_for_subscriber_s: float = Field(
        0.0, ge=0, le=3600,
        description="Before starting, wait up to this long for a subscriber (one subscribed to all topics or to 'welcome'), so it sees run_start; 0: start at once.",
    )


class ControlConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5557", description="ZeroMQ REP endpoint for control requests.")
    read_only: bool = Field(False, description="Refuse 'act' and 'set' (status, pause, resume and stop still work).")
    curve_server_secret_key_file: str | None = Field(
        None,
        description="ZeroMQ CURVE server key pair (a zmq.auth .key_secret file). Required when control.endpoint is not loopback.",
    )
    curve_allowed_clients_dir: str | None = Field(
        None,
        description="Folder of allowed client public keys (zmq.auth .key files); only these clients are answered. Required with the server key.",
    )


class MetricsConfig(_Section):
    port: int = Field(9108, ge=0, le=65535, description="Prometheus metrics port on metrics.host (0: pick a free port).")
    host: str = Field("127.0.0.1", description="Address the metrics HTTP server binds to.")
    enabled: bool = Field(True, description="Serve metrics over HTTP.")


class OffloadConfig(_Section):
    """The engine's off-thread service for slow stages (MUSICAL windows, networks)."""

    backend: Literal["processes", "threads", "dask"] = Field(
        "processes", description="Where slow jobs run: spawned worker processes, threads of the daemon, or a Dask distributed cluster.",
    )
    scheduler_address: str | None = Field(
        None, description="Dask scheduler to send jobs to (backend 'dask'), e.g. 'tcp://10.0.0.5:8786'; None: start a LocalCluster of `workers` single-threaded worker processes for the run.",
    )
    workers: int = Field(1, ge=1, le=256, description="Worker processes or threads (and LocalCluster workers for 'dask' without a scheduler_address).")
    max_in_flight_jobs: int = Field(8, ge=1, le=4096, description="Jobs submitted and not yet delivered, at most, over all stages (each stage also bounds its own, e.g. musical.max_pending_windows = 4, so that one stage cannot starve another); beyond it a job is skipped and counted.")
    teardown_timeout_s: float = Field(120.0, gt=0, le=3600, description="At the end of a run, wait at most this long for jobs in flight, s.")
    worker_niceness: int = Field(
        10, ge=0, le=19,
        description="Backend 'processes': each worker raises its niceness by this much (os.nice) when it starts, so that the camera path wins the CPU when the cores are busy; 0: same priority as the daemon.",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> OffloadConfig:
        if self.scheduler_address is not None and self.backend != "dask":
            raise ValueError(
                f"offload.scheduler_address is set ({self.scheduler_address!r}) but offload.backend is "
                f"{self.backend!r}; the address is used only with backend 'dask'"
            )
        return self


class SimulationConfig(BaseModel):
    """Simulated-camera scene and camera parameters; validated by :mod:`scopestream.sim_camera`."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ScopestreamConfig(BaseModel):
    """The whole configuration. Stage sections (``frame_stats``, ``localize``, ...) are extra keys
    validated against each stage plugin's own settings model."""

    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True)

    optics: OpticsConfig = Field(default_factory=OpticsConfig, description="Microscope optics.")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="Camera noise model and limits.")
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig, description="Timing of the acquisition.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="Where frames come from.")
    bus: BusConfig = Field(default_factory=BusConfig, description="The bounded queue between source and stages.")
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES), description="Ordered stage names to run.")
    events: EventsConfig = Field(default_factory=EventsConfig, description="Event stream (ZeroMQ PUB).")
    control: ControlConfig = Field(default_factory=ControlConfig, description="Control channel (ZeroMQ REP).")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics.")
    offload: OffloadConfig = Field(default_factory=OffloadConfig, description="Off-thread service for slow stages.")
    simulation: dict[str, Any] = Field(
        default_factory=dict, description="Simulated camera parameters (see scopestream.sim_camera)."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Actuator limits (travel box, largest step, highest rate).")
    rules: list[RuleConfig] = Field(default_factory=list, description="Declarative rules: when an event matches, do an action.")

    @model_validator(mode="after")
    def _validate_rules(self) -> ScopestreamConfig:
        if not self.rules:
            return self
        from scopestream.daemon._messages import ENGINE_BODIES

        # Every installed stage's topics, so that a rule on a stage not in this run is named as such.
        plugins: dict[str, StagePlugin] = {}
        for name in _plugin_names():
            try:
                plugins[name] = _load_plugin(name)
            except ValueError:  # a broken plugin this run does not use must not fail it
                if name in self.stages:
                    raise
        topic_models = dict(ENGINE_BODIES)
        for plugin in plugins.values():
            topic_models.update(plugin.topics)
        run_topics = [*ENGINE_BODIES, *(t for name in self.stages if name in plugins for t in plugins[name].topics)]
        try:
            check_rules(self.rules, topic_models, run_topics)
        except RuleCheckError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="before")
    @classmethod
    def _validate_stage_sections(cls, data: Any) -> Any:
        """Check the stage list and validate each stage section (an extra key) against its plugin's
        settings model before the frozen model is built, so that its extra fields hold settings
        models from the start. Only the plugins this configuration names are imported."""
        if not isinstance(data, Mapping):
            return data  # pydantic refuses it with its own message
        stages = data.get("stages", list(DEFAULT_STAGES))
        if not isinstance(stages, list | tuple) or not all(isinstance(s, str) for s in stages):
            return data  # the `stages` field reports it
        names = _plugin_names()
        unknown = [s for s in stages if s not in names]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; installed stages: {sorted(names)}")
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice in {list(stages)}")
        extra = {key: value for key, value in data.items() if key not in cls.model_fields}
        for key in extra:
            if key not in names:
                raise ValueError(
                    f"unknown configuration section {key!r}; sections are "
                    f"{sorted([*cls.model_fields, *names])}"
                )
        plugins = {name: _load_plugin(name) for name in dict.fromkeys([*stages, *extra])}
        try:
            check_products(stages, plugins)
        except ValueError:  # rare: import every installed plugin to name the one that would help
            check_products(stages, {**stage_plugins(), **plugins})
            raise
        try:  # stage settings may check themselves against these sections (the pydantic context)
            context = {name: section.model_validate(data.get(name, {}))
                       for name, section in (("optics", OpticsConfig), ("camera", CameraConfig),
                                             ("acquisition", AcquisitionConfig), ("source", SourceConfig))}
        except ValidationError:
            return data  # the section's own field reports it
        out = dict(data)
        for name, plugin in plugins.items():
            value = extra.get(name, {})
            if isinstance(value, BaseModel):
                value = value.model_dump()  # re-checked against this configuration's optics
            try:
                out[name] = plugin.settings_model.model_validate(value, context=context)
            except ValidationError as exc:  # name the section: `localize.threshold_snr`
                raise ValueError(describe_validation_error(exc, prefix=name)) from None
        return out

    @model_validator(mode="after")
    def _validate_simulation(self) -> ScopestreamConfig:
        if self.uses_simulated_camera:
            # Imported only here: the simulators pull in scipy.stats.
            from scopestream.sim_camera._settings import physics_from_config

            physics_from_config(self)  # raises ConfigError naming `simulation.<key>`
        return self

    @property
    def uses_simulated_camera(self) -> bool:
        """Whether frames come from one of scopestream's simulated cameras (``simulation`` applies)."""
        return self.source.kind == "micromanager" and self.source.mm_config in SIMULATED_CAMERAS

    def stage_settings(self, name: str) -> BaseModel:
        """The validated settings section of stage ``name`` (a stage in ``stages`` or a section given)."""
        extra = self.model_extra or {}
        section = extra.get(name)
        if not isinstance(section, BaseModel):
            raise KeyError(f"no settings section {name!r} in this configuration; it has {sorted(extra)}")
        return section


_REGISTERED: dict[str, StagePlugin] = {}
_LOADED: dict[str, StagePlugin] = {}


def _plugin_names() -> set[str]:
    return set(stage_plugin_names()) | set(_REGISTERED)


def _load_plugin(name: str) -> StagePlugin:
    """The plugin ``name``: registered, or its entry point imported once (ValueError if it fails)."""
    plugin = _REGISTERED.get(name) or _LOADED.get(name)
    if plugin is None:
        try:
            plugin = _LOADED[name] = load_stage_plugin(name)
        except (ImportError, TypeError, KeyError) as exc:
            raise ValueError(str(exc).strip('"')) from None
    return plugin


def register_stage_plugin(plugin: StagePlugin, *, replace: bool = False) -> None:
    """Register a stage without an entry point (notebooks, tests). Entry points are preferred.

    Raises
    ------
    ValueError
        If a stage of that name is installed (an entry point such as ``localize``) or already
        registered, unless ``replace=True``: a notebook cell run twice, or a typo'd name, must not
        silently change which stage a configuration runs.
    """
    if not isinstance(plugin, StagePlugin):
        raise TypeError(f"register_stage_plugin takes a StagePlugin, not {type(plugin).__name__}")
    if not replace:
        if plugin.name in stage_plugin_names():
            raise ValueError(f"a stage named {plugin.name!r} is installed (entry point); choose another name, "
                             "or pass replace=True to shadow it")
        if plugin.name in _REGISTERED and _REGISTERED[plugin.name] is not plugin:
            raise ValueError(f"a stage named {plugin.name!r} is already registered; pass replace=True to replace it")
    _REGISTERED[plugin.name] = plugin


def stage_plugins(names: Iterable[str] | None = None) -> dict[str, StagePlugin]:
    """Stage plugins by name: those in ``names`` (each imported on first use), or every
    installed and registered one when ``names`` is None (imports them all).

    Raises
    ------
    ConfigError
        If a plugin is not installed or cannot be imported (the message says what to install).
    """
    wanted = sorted(_plugin_names()) if names is None else list(names)
    try:
        return {name: _load_plugin(name) for name in wanted}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# -- loading ---------------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded, and reading ``1e-3`` as a number as YAML 1.2 does.

    A YAML alias refers to a node without copying it, so a short document can describe an
    exponentially large one (the "billion laughs"); it is refused once composed if following its
    aliases would visit more than :data:`MAX_YAML_NODES` nodes, or if it nests deeper than
    :data:`MAX_NESTING_DEPTH` or refers to itself.
    """

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_node_size(node)
        return node  # type: ignore[no-any-return]


# YAML 1.1 (PyYAML) reads `1e-3` and `1e11` as strings; YAML 1.2 and every user read numbers.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _check_node_size(root: yaml.Node) -> None:
    """Raise ConfigError if ``root`` expands beyond the bounds (iterative: no recursion)."""
    expanded: dict[int, int] = {}  # node id -> nodes it expands to
    depth_of: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            expanded[key] = 1 + sum(expanded[id(c)] for c in children)
            if expanded[key] > MAX_YAML_NODES:
                raise ConfigError(
                    f"the YAML document expands to more than {MAX_YAML_NODES} values once its aliases "
                    "are followed (an alias bomb?); write the values out instead"
                )
            continue
        if key in expanded and depth_of.get(key, 0) >= depth:
            continue
        if key in on_path:
            raise ConfigError("the YAML document refers to itself through an alias (a recursive structure)")
        if depth > MAX_NESTING_DEPTH:
            raise ConfigError(f"the YAML document nests deeper than {MAX_NESTING_DEPTH} levels")
        depth_of[key] = depth
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a mapping, or raise ConfigError.

    The file must be text (UTF-8), at most :data:`MAX_CONFIG_FILE_BYTES` long, and YAML aliases
    may not expand it beyond :data:`MAX_YAML_NODES` values.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(
            f"configuration file {str(path)!r} is larger than {MAX_CONFIG_FILE_BYTES} bytes; "
            "a configuration is a few kB of YAML or TOML"
        )
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"configuration file {str(path)!r} is not a text file (byte {exc.start}: {exc.reason}); "
            "expected YAML or TOML in UTF-8"
        ) from None
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        data = tomllib.loads(text) if kind == "TOML" else _load_yaml(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"configuration file {str(path)!r} is not valid {kind}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"configuration file {str(path)!r} nests too deeply to be a configuration") from None
    except ConfigError as exc:
        raise ConfigError(f"configuration file {str(path)!r}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {str(path)!r} must hold a mapping at the top, not {type(data).__name__}")
    _check_depth(data, f"configuration file {str(path)!r}")
    return data


def _check_depth(data: Any, what: str) -> None:
    """Raise ConfigError if ``data`` nests mappings/lists deeper than MAX_NESTING_DEPTH."""
    level = [data]
    for _ in range(MAX_NESTING_DEPTH + 1):
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())]
        if not level:
            return
    raise ConfigError(f"{what} nests deeper than {MAX_NESTING_DEPTH} levels")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {text!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    except ConfigError as exc:
        raise ConfigError(f"--set {key.strip()}: {exc}") from None
    _check_depth(value, f"--set {key.strip()}")
    return key.strip(), value


def apply_override(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``data`` with the dotted ``key`` set to ``value``."""
    out = json.loads(json.dumps(data, default=_jsonable))
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def build_config(data: Mapping[str, Any]) -> ScopestreamConfig:
    """Validate a mapping into a :class:`ScopestreamConfig`, or raise :class:`ConfigError`."""
    try:
        return ScopestreamConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    preset: Mapping[str, Any] | None = None,
) -> ScopestreamConfig:
    """Load a configuration file (or the defaults), then set the dotted keys of ``preset``
    (values a command imposes, e.g. ``analyze``'s file source), then apply ``KEY=VALUE`` overrides."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in (preset or {}).items():
        data = apply_override(data, key, value)
    for text in overrides:
        key, value = parse_override(text)
        data = apply_override(data, key, value)
    return build_config(data)


def config_with(config: ScopestreamConfig, key: str, value: Any) -> ScopestreamConfig:
    """A new, validated configuration with one dotted key changed."""
    return build_config(apply_override(config_to_dict(config), key, value))


def config_to_dict(config: ScopestreamConfig) -> dict[str, Any]:
    """The configuration as plain data (stage sections included)."""
    data = config.model_dump(mode="json")
    for name, section in (config.model_extra or {}).items():
        data[name] = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return data


def default_config_yaml() -> str:
    """The default configuration as commented-free YAML, every key shown."""
    return yaml.safe_dump(config_to_dict(ScopestreamConfig()), sort_keys=False)


_UNION_TAG = re.compile(r"^(float|int|str|bool|none|literal\[.*\]|constrained-.*|function-.*|tuple\[.*\]|list\[.*\]|dict\[.*\])$")
_TYPE_MISMATCH = ("literal_error", "float_type", "int_type", "string_type", "bool_type", "tuple_type",
                  "dict_type", "list_type", "none_required")


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One paragraph naming each bad key, the value given and what is allowed."""
    entries = []
    for err in exc.errors():
        # Drop the branch tags pydantic puts in the location of a union (`threshold.float`).
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "" and not _UNION_TAG.match(str(p)))
        entries.append((loc or "(top level)", err))
    # A union reports one error per alternative; when a value fails an alternative's own checks
    # (finite, bounds), "should be 'auto'" from the other alternative is noise.
    specific = {loc for loc, err in entries if err["type"] not in _TYPE_MISMATCH}
    parts = []
    for loc, err in entries:
        if loc in specific and err["type"] in _TYPE_MISMATCH:
            continue
        given = err.get("input")
        shown = _short_repr(given)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key (given {shown})")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required")
        elif err["type"] == "value_error" and (isinstance(given, dict) or msg.startswith("invalid configuration: ")):
            parts.append(msg.removeprefix("invalid configuration: ") if loc == "(top level)" else f"{loc}: {msg.removeprefix('invalid configuration: ')}")
        else:
            parts.append(f"{loc}: {msg} (given {shown})")
    return ("" if prefix else "invalid configuration: ") + "; ".join(dict.fromkeys(parts))


def _short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a message must stay one paragraph)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
